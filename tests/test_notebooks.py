"""Every chapter runs end to end at the smoke preset, and bad parameters fail clearly."""
import json
from pathlib import Path

import papermill
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def execute(notebook: Path, out: Path, **parameters):
    return papermill.execute_notebook(str(notebook), str(out), parameters=parameters, kernel_name="python3",
                                      cwd=str(notebook.parent), progress_bar=False)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_smoke_run_writes_results(notebook, tmp_path, results_tmp):
    execute(notebook, tmp_path / notebook.name, preset="smoke")
    saved = json.loads((results_tmp / f"{notebook.stem}.json").read_text())
    assert saved["preset"] == "smoke"
    assert saved["verdicts"] and all(v["verdict"] for v in saved["verdicts"])
    assert saved["runtime_seconds"] < 120


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
@pytest.mark.parametrize("parameters, message", [
    ({"preset": "huge"}, "preset='huge' is not valid; choose one of: smoke, book, paper"),
    ({"preset": "smoke", "bogus_knob": 1}, "unknown parameter(s) 'bogus_knob'; valid parameters: preset"),
])
def test_bad_parameters_fail_with_a_clear_message(notebook, tmp_path, results_tmp, parameters, message):
    with pytest.raises(papermill.PapermillExecutionError) as err:
        execute(notebook, tmp_path / notebook.name, **parameters)
    assert message in str(err.value)
    assert not results_tmp.exists() or not list(results_tmp.iterdir()), "a failed run must write no results"


@pytest.mark.parametrize("notebook", [n for n in NOTEBOOKS if n.stem[:2] in ("08", "10")], ids=lambda p: p.stem)
def test_a_value_the_rules_forbid_is_refused_in_the_config_cell(notebook, tmp_path, results_tmp):
    """The notebook itself checks its module's parameter_rules() (config.from_notebook), before
    any model loads: for papermill started directly. (Every chapter's rules: test_parameters.py.)"""
    with pytest.raises(papermill.PapermillExecutionError) as err:
        execute(notebook, tmp_path / notebook.name, preset="smoke", threads=0)
    assert err.value.exec_count <= 3, "refused later than the config cell"
    assert "parameter threads=0 is not allowed at the 'smoke' preset: it must be an integer ≥ 1" in str(err.value)
    assert not results_tmp.exists() or not list(results_tmp.iterdir())


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_figure_cells_show_exactly_one_output(notebook):
    """A cell with a figure caption must display only its figure: a second output (say
    the Text a trailing ``ax.set_ylabel(...)`` returns) makes a duplicate figure target,
    which fails the site build under -W. End such cells with ``_ = ...``."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or "figure" not in cell.metadata.get("mystnb", {}):
            continue
        shown = [o for o in cell.outputs if o.output_type in ("display_data", "execute_result")]
        assert len(shown) == 1 and "image/png" in shown[0].data, (
            f"{notebook.name}, cell {index}: a figure cell shows {len(shown)} outputs "
            f"({[sorted(o.data) for o in shown]}); it must show exactly one PNG")
