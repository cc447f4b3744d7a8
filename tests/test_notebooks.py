"""Every chapter runs end to end at the smoke preset, and bad parameters fail clearly."""
import json
import re
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


BAD_PARAMETERS = [
    ({"preset": "huge"}, "preset='huge' is not valid; choose one of: smoke, book, paper"),
    ({"preset": "smoke", "bogus_knob": 1}, "unknown parameter(s) 'bogus_knob'; valid parameters: preset"),
]
# chapters whose bad parameters go through a real kernel (each start costs ~15 s of CI);
# every chapter's config cell is run in-process below, and test_cli/test_parameters cover
# `replbook run`, which refuses bad parameters before any kernel starts
THROUGH_A_KERNEL = ("00", "06")


@pytest.mark.parametrize("notebook", [n for n in NOTEBOOKS if n.stem[:2] in THROUGH_A_KERNEL], ids=lambda p: p.stem)
@pytest.mark.parametrize("parameters, message", BAD_PARAMETERS)
def test_bad_parameters_fail_with_a_clear_message(notebook, tmp_path, results_tmp, parameters, message):
    with pytest.raises(papermill.PapermillExecutionError) as err:
        execute(notebook, tmp_path / notebook.name, **parameters)
    assert message in str(err.value)
    assert err.value.exec_count <= 3, "refused later than the config cell"
    assert not results_tmp.exists() or not list(results_tmp.iterdir()), "a failed run must write no results"


def config_cell_in_process(notebook: Path, **parameters) -> None:
    """What the kernel runs first, run here: the parameters cell, papermill's injected
    values, and the chapter's first cell up to its ``config.from_notebook`` line, which
    must come before anything else that cell does (no model loads before the check)."""
    import nbformat

    code = [c for c in nbformat.read(notebook, as_version=4).cells if c.cell_type == "code"
            and "injected-parameters" not in c.metadata.get("tags", [])]
    assert "parameters" in code[0].metadata.get("tags", []), f"{notebook.name}: the first code cell must be the parameters"
    first = code[1].source
    assert "config.from_notebook(" in first, f"{notebook.name}: the cell after the parameters must check them"
    upto = first[:first.index("\n", first.index("config.from_notebook(")) + 1]
    statements = [line for line in upto.splitlines() if line.strip() and not line.startswith((" ", "#"))]
    assert all(s.startswith(("import ", "from ")) for s in statements[:-1]), (
        f"{notebook.name}: only imports may run before config.from_notebook")
    injected = "# Parameters\n" + "".join(f"{name} = {value!r}\n" for name, value in parameters.items())
    namespace = {"In": ["", code[0].source, injected, upto]}
    for source in namespace["In"][1:]:
        exec(compile(source, notebook.name, "exec"), namespace)


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
@pytest.mark.parametrize("parameters, message", BAD_PARAMETERS)
def test_every_config_cell_refuses_bad_parameters_before_anything_runs(notebook, parameters, message):
    with pytest.raises(ValueError) as err:
        config_cell_in_process(notebook, **parameters)
    assert message in str(err.value)


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


LONG_PLOTTING_CELL = 5  # lines: a figure cell longer than this collapses on the site


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_long_plotting_cells_collapse_behind_a_line_saying_what_they_draw(notebook):
    """A reader sees claims, figures and verdicts first; the plotting code stays one click
    away behind a toggle that names what it draws (myst-nb's ``hide-input`` tag and the
    cell's ``mystnb.code_prompt_show``; the site test checks the rendered toggle)."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    prompts = []
    for index, cell in enumerate(nb.cells):
        mystnb = cell.metadata.get("mystnb", {})
        if cell.cell_type != "code" or "figure" not in mystnb or len(cell.source.splitlines()) <= LONG_PLOTTING_CELL:
            continue
        assert "hide-input" in cell.metadata.get("tags", []), f"{notebook.name}, cell {index}: tag it hide-input"
        prompt = mystnb.get("code_prompt_show", "")
        assert prompt.startswith("Show the code that draws ") and len(prompt) <= 90, (
            f"{notebook.name}, cell {index}: code_prompt_show must say in one line what the code draws, got {prompt!r}")
        prompts.append(prompt)
    assert len(prompts) == len(set(prompts)), f"{notebook.name}: two toggles say the same thing"


# a tqdm bar as the executed notebook keeps it: "12/300 [00:01<00:43,  6.75it/s]"
PROGRESS_BAR = re.compile(r"\d+/\d+ \[\d\d:\d\d<")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_cells_that_show_a_progress_bar_are_not_compared_by_nbval(notebook):
    """A progress bar's elapsed times and rates differ on every run, so nbval would fail on it
    (chapter 08's protocol-variants cell did, on a cold run). Such a cell's numbers reach the
    regression guard through the results file instead."""
    import nbformat

    nb = nbformat.read(notebook, as_version=4)
    compared_bars = [i for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
                     and "nbval-ignore-output" not in cell.metadata.get("tags", [])
                     and any(PROGRESS_BAR.search(o.get("text", "")) for o in cell.get("outputs", [])
                             if o.get("output_type") == "stream")]
    assert not compared_bars, f"{notebook.name}: cells {compared_bars} show a progress bar but nbval compares them"
