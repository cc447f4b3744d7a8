import pytest

from replbook import cli


def test_parse_parameters():
    assert cli.parse_parameters(["n=4", "models=['a', 'b']", "name=smollm2-135m", "x=1.5"]) == \
        {"n": 4, "models": ["a", "b"], "name": "smollm2-135m", "x": 1.5}
    with pytest.raises(ValueError, match="name=value"):
        cli.parse_parameters(["oops"])


def test_unknown_chapter_lists_the_valid_ones(repo_root):
    with pytest.raises(ValueError, match=r"chapter='99' is not valid; choose one of: 00"):
        cli.run("99", root=repo_root)


def test_unknown_preset_and_parameter_fail_before_running(repo_root):
    with pytest.raises(ValueError, match=r"preset='huge' is not valid; choose one of: smoke, book, paper"):
        cli.run("00", "huge", root=repo_root)
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) epochs.*valid parameters: preset, language_models"):
        cli.run("00", "smoke", {"epochs": 3}, root=repo_root)


def test_main_reports_errors_with_exit_code_2(capsys):
    assert cli.main(["run", "00", "--preset", "huge"]) == 2
    assert "choose one of: smoke, book, paper" in capsys.readouterr().err


def test_a_failed_run_leaves_the_committed_notebook_and_results_untouched(repo_root, results_tmp):
    import papermill

    notebook = cli.notebook_for("00", repo_root)
    before = notebook.read_bytes()
    with pytest.raises(papermill.PapermillExecutionError, match="parameter 'max_new_tokens' must be int"):
        cli.run("00", "book", {"max_new_tokens": "six"}, root=repo_root)
    assert notebook.read_bytes() == before
    assert not list(notebook.parent.glob(".00_model_zoo.*")), "temporary notebook left behind"
    assert not results_tmp.exists() or not list(results_tmp.iterdir())


def test_clean_metadata_drops_timings(tmp_path):
    import json

    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps({"cells": [{"cell_type": "code", "metadata": {"papermill": {"duration": 1},
                                "execution": {"x": 1}, "tags": ["a"]}}],
                                "metadata": {"papermill": {"duration": 3, "parameters": {"preset": "book"}}}}))
    cli.clean_metadata(path)
    nb = json.loads(path.read_text())
    assert nb["cells"][0]["metadata"] == {"tags": ["a"]}
    assert nb["metadata"]["papermill"] == {"parameters": {"preset": "book"}}


def test_needs_execution(tmp_path):
    import json

    (tmp_path / "notebooks").mkdir()
    (tmp_path / "results").mkdir()
    nb = tmp_path / "notebooks" / "05_x.ipynb"
    nb.write_text(json.dumps({"cells": [{"cell_type": "code", "source": ["1"], "execution_count": 1}]}))
    assert cli.needs_execution(nb, tmp_path)  # no results yet
    (tmp_path / "results" / "05_x.json").write_text("{}")
    assert not cli.needs_execution(nb, tmp_path)
    nb.write_text(json.dumps({"cells": [{"cell_type": "code", "source": ["1"], "execution_count": None}]}))
    assert cli.needs_execution(nb, tmp_path)
