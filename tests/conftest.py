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
