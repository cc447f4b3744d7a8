import os
import sys
from pathlib import Path

# Every test runs offline, as a reader's laptop may; kernels run interpreted on a CPU.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
