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
