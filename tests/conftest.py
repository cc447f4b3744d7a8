import os
import re
import sys
from pathlib import Path

# Every test runs offline, as a reader's laptop may; kernels run interpreted on a CPU.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the AVX2 code of ATen, oneDNN and MKL, as the book's runs use (runner.CPU_PINS): set before torch
# is imported here and inherited by nbval's kernels
from replbook.runner import CPU_PINS  # noqa: E402  (imports no torch)

for _name, _value in CPU_PINS.items():
    os.environ.setdefault(_name, _value)
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest

ROOT = Path(__file__).resolve().parents[1]
# where nbval's re-execution of the committed notebooks writes its results (the Makefile
# sets it; the regression guard in test_regression.py reads it)
NBVAL_RESULTS = Path(os.environ.get("REPLBOOK_RESULTS_DIR") or ROOT / "runs" / "nbval-results")


def nbval_active(config) -> bool:
    return bool(getattr(config.option, "nbval", False) or getattr(config.option, "nbval_lax", False))


# One-time cache notices ("fetching … once into …") are printed only by the run that builds
# the cache entry, so a notebook executed on a cold cache and re-executed on a warm one (or
# the reverse, a new reader's first `make test`) would differ by them alone. nbval compares
# streams with everything else; these lines are dropped from both sides before it does.
CACHE_NOTICES = re.compile(r"^(fetching .+ once into .+|converting .+ from GGUF to safetensors once.*"
                           r"|decoding .+ once from the book's copy .+"
                           r"|cache entry \S+ predates checksums; hashing it once"
                           r"|cache entry \S+: .+; building it again)(\n|$)", re.M)


def without_cache_notices(outputs):
    kept = []
    for output in outputs:
        if output.get("output_type") == "stream":
            text = CACHE_NOTICES.sub("", output.get("text", ""))
            if not text:
                continue
            output = type(output)(output)
            output["text"] = text
        kept.append(output)
    return kept


def _compare_without_cache_notices():
    try:
        from nbval.plugin import IPyNbCell
    except ImportError:  # pragma: no cover - nbval is in requirements.txt
        return
    compare = IPyNbCell.compare_outputs
    if getattr(compare, "drops_cache_notices", False):
        return

    def compare_outputs(self, test, ref, skip_compare=None):
        return compare(self, without_cache_notices(test), without_cache_notices(ref), skip_compare)

    compare_outputs.drops_cache_notices = True
    IPyNbCell.compare_outputs = compare_outputs


_compare_without_cache_notices()


def pytest_configure(config):
    config.addinivalue_line("markers", "after_nbval: runs after nbval has re-executed the notebooks")
    if nbval_active(config):
        import shutil

        # a fresh folder, so the guard can only read what this session's nbval run wrote
        if NBVAL_RESULTS.resolve().is_relative_to((ROOT / "runs").resolve()):
            shutil.rmtree(NBVAL_RESULTS, ignore_errors=True)
        os.environ["REPLBOOK_RESULTS_DIR"] = str(NBVAL_RESULTS)  # the notebooks' kernels inherit it


def nbval_outcomes(config) -> dict[str, list[bool]]:
    """Per chapter, whether each of its cells passed under nbval in this session (the by-hand
    rerun records need it: a chapter's guard passing is not enough, every cell must have too).
    Read from the terminal reporter's tallies: a hook here would not see the notebooks' items,
    which lie outside tests/, where this conftest's per-item hooks apply."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    outcomes: dict[str, list[bool]] = {}
    for category in ("passed", "failed", "error"):
        for report in (reporter.stats.get(category, []) if reporter else []):
            path = Path(getattr(report, "nodeid", "").split("::")[0])
            if path.parent.name == "notebooks" and path.suffix == ".ipynb":
                outcomes.setdefault(path.stem, []).append(category == "passed")
    return outcomes


def pytest_collection_modifyitems(session, config, items):
    """Tests marked ``after_nbval`` (the regression guard) run last, after the notebooks; and
    on a machine of another numerics family than a chapter's published run, nbval expects
    that family's recorded outputs (:func:`expect_this_familys_outputs`)."""
    late = [item for item in items if item.get_closest_marker("after_nbval")]
    items[:] = [item for item in items if not item.get_closest_marker("after_nbval")] + late
    expect_this_familys_outputs(items)


def expect_this_familys_outputs(items, family: str | None = None) -> dict[str, str]:
    """For each committed notebook nbval collected: where this machine's numerics family has a
    reference (``results/reference/<family>/<slug>.json``, see ``replbook.numerics``), each
    cell's expected outputs become the reference's, so nbval holds the rerun to the numbers
    this family's sums give, as tightly as the published family is held to the notebook's.
    On a family pending for the chapter (its own numbers of the current code not yet recorded)
    nbval runs each cell without comparing its outputs: the guard holds the rerun's verdicts
    and numbers (``numerics.pending_view``). Returns what each notebook is held to (a stale or
    misaligned reference is left for the regression guard to report: nbval then compares
    against the notebook as committed)."""
    import nbformat
    from replbook import numerics

    held_to, expected, compared = {}, {}, {}
    for item in items:
        notebook = getattr(item, "parent", None)
        path = Path(str(getattr(notebook, "fspath", "")))
        if type(item).__name__ != "IPyNbCell" or path.parent != ROOT / "notebooks":
            continue
        slug = path.stem
        if slug not in expected:
            try:
                reference = numerics.Expected(slug, family, ROOT)
                expected[slug], compared[slug] = reference.cell_outputs(notebook.nb), reference.compares_outputs
                held_to[slug] = reference.source
            except (KeyError, ValueError) as err:
                expected[slug], compared[slug], held_to[slug] = None, True, f"the committed notebook ({err})"
        if not compared[slug]:
            # nbval: run the cell, compare nothing. Set in nbval's own mapping: it is a
            # defaultdict(bool) that nbval reads other keys from ("skip", "check_exception"),
            # so a plain dict in its place fails every cell with a KeyError
            item.options["check"] = False
        elif expected[slug] is not None:
            item.cell = nbformat.from_dict({**item.cell, "outputs": expected[slug][item.cell_num]})
    return held_to


@pytest.fixture
def repo_root() -> Path:
    return ROOT


@pytest.fixture
def results_tmp(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "results"
    monkeypatch.setenv("REPLBOOK_RESULTS_DIR", str(folder))
    return folder


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def tiny_llama():
    """The registry's 2-layer random Llama with its byte-level tokenizer."""
    from replbook import models

    return models.load("tiny-llama", preset="smoke")


@pytest.fixture
def run_paper_preset_on_tiny_llama(tiny_llama, tmp_path, results_tmp):
    """Run a chapter at the paper preset with its models replaced by the tiny Llama, saved
    with save_pretrained as a hub model would be; returns the chapter's saved results."""
    import json

    import papermill

    folder = tmp_path / "tiny-llama"
    tiny_llama.model.save_pretrained(folder)
    tiny_llama.tokenizer.save_pretrained(folder)

    def run(slug: str, model_lists: tuple[str, ...] = (), model_names: tuple[str, ...] = (), **parameters) -> dict:
        """``model_lists`` name list-valued model parameters, ``model_names`` single ones."""
        notebook = ROOT / "notebooks" / f"{slug}.ipynb"
        parameters.update({name: [str(folder)] for name in model_lists})
        parameters.update({name: str(folder) for name in model_names})
        papermill.execute_notebook(str(notebook), str(tmp_path / "out.ipynb"), kernel_name="python3",
                                   cwd=str(notebook.parent), progress_bar=False,
                                   parameters={"preset": "paper", **parameters})
        return json.loads((results_tmp / f"{slug}.json").read_text())

    return run


@pytest.fixture(scope="session")
def clip_like():
    """Chapter 03's CLIP-like model (EfficientNet-Lite0 + MiniLM), shared by its tests."""
    from replbook import cliplike

    return cliplike.ClipLike()
