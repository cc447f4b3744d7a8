"""Where things live: the repository, its results folder, the cache outside it."""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

_MARKERS = ("_toc.yml", "pyproject.toml")


def repo_root(start: Path | None = None) -> Path:
    """The book's repository: ``$REPLBOOK_ROOT``, else the first folder upward from
    ``start`` (default: the working directory) holding ``_toc.yml`` and ``pyproject.toml``."""
    if os.environ.get("REPLBOOK_ROOT"):
        return Path(os.environ["REPLBOOK_ROOT"]).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if all((folder / m).exists() for m in _MARKERS):
            return folder
    # an editable install: lib/replbook/paths.py -> repo root two levels up
    guess = Path(__file__).resolve().parents[2]
    if all((guess / m).exists() for m in _MARKERS):
        return guess
    raise FileNotFoundError(
        f"cannot find the book's repository above {here}; run from inside it or set REPLBOOK_ROOT"
    )


def results_dir() -> Path:
    """Where a running chapter writes its results file: ``$REPLBOOK_RESULTS_DIR`` (``replbook
    run`` points it at a staging folder, nbval and the tests at theirs), else
    ``<repo>/runs/unpublished`` — a notebook started by papermill or Jupyter directly never
    writes ``results/``; only ``replbook run`` publishes a finished book or paper run there."""
    if os.environ.get("REPLBOOK_RESULTS_DIR"):
        return Path(os.environ["REPLBOOK_RESULTS_DIR"])
    return repo_root() / "runs" / "unpublished"


def cache_dir(*parts: str) -> Path:
    """Expensive artifacts (converted models, features) live here, outside the repo:
    ``$REPLBOOK_CACHE``, else ``~/.cache/replbook``."""
    base = Path(os.environ.get("REPLBOOK_CACHE", Path.home() / ".cache" / "replbook"))
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def code_hash(*functions: Callable) -> str:
    """sha256 of the functions' source and the torch/transformers versions: part of every
    cache key, so a cached artifact is rebuilt when the code that made it changes."""
    import torch
    import transformers

    text = "".join(inspect.getsource(f) for f in functions)
    text += f"torch={torch.__version__} transformers={transformers.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()


def atomic_dir(final: Path, build: Callable[[Path], dict]) -> dict:
    """Build a cache folder in a temporary sibling and rename it into place, so an
    interrupted build never leaves a half-written cache entry. ``build`` fills the
    folder and returns its manifest (written as ``manifest.json``)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        manifest = build(tmp)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        if final.exists():  # a stale or corrupt entry
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def cached_torch(folder: str, key: str, build: Callable[[], Any]) -> tuple[Any, bool]:
    """``build()``'s result saved with ``torch.save`` under ``cache_dir(folder)``, named by
    the sha256 of ``key`` (which must name the inputs *and* the code that made it; see
    :func:`code_hash`); written to a temporary file and renamed, so an interrupted run
    leaves no half-written entry. Returns (the object, whether it came from the cache)."""
    import torch

    path = cache_dir(folder) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"
    if path.exists():
        return torch.load(path, weights_only=False), True
    value = build()
    partial = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(value, partial)
    os.replace(partial, path)
    return value, False
