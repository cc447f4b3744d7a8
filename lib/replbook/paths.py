"""Where things live: the repository, its results folder, the cache outside it."""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
import time
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


def notebook_for(chapter: str, root: Path) -> Path:
    """``notebooks/<NN>_*.ipynb``; ``1`` means ``01``."""
    chapter = str(chapter).strip()
    if chapter.isdigit() and len(chapter) < 2:
        chapter = chapter.zfill(2)
    found = sorted((root / "notebooks").glob(f"{chapter}_*.ipynb")) if chapter.isdigit() else []
    if len(found) != 1:
        valid = sorted(p.name.split("_")[0] for p in (root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
        raise ValueError(f"chapter={chapter!r} is not valid; choose one of: {', '.join(valid)}")
    return found[0]


def chapter_module(notebook: Path):
    """The ``replbook`` module whose ``PRESETS`` the notebook's parameters cell reads."""
    import importlib
    import re

    found = re.search(r"config\.from_notebook\((\w+)\.PRESETS", notebook.read_text())
    if not found:
        raise ValueError(f"{notebook.name} does not call config.from_notebook(<module>.PRESETS, globals())")
    return importlib.import_module(f"replbook.{found.group(1)}")


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


RULES_NAME = "parameter_rules"


def without_parameter_rules(source: str) -> str:
    """``source`` less its top-level ``def parameter_rules(): ...`` (with the comment lines
    right above it and one blank line before those). The rules say which values a chapter
    refuses; they never change a run they accept, so neither a cache key nor a chapter's
    code version counts them, and tightening a rule retrains nothing."""
    import ast

    if RULES_NAME not in source:
        return source
    lines = source.splitlines(keepends=True)
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name == RULES_NAME:
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
            while start > 0 and lines[start - 1].lstrip().startswith("#"):
                start -= 1
            if start > 0 and not lines[start - 1].strip():
                start -= 1
            return "".join(lines[:start] + lines[node.end_lineno:])
    return source


def code_hash(*functions: Callable) -> str:
    """sha256 of the functions' source and the torch/transformers versions: part of every
    cache key, so a cached artifact is rebuilt when the code that made it changes (a
    module's ``parameter_rules`` do not count: :func:`without_parameter_rules`)."""
    import torch
    import transformers

    text = "".join(without_parameter_rules(inspect.getsource(f)) for f in functions)
    text += f"torch={torch.__version__} transformers={transformers.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- the cache
#
# One mechanism for every cache entry: an entry is a folder (or, for cached_torch, one
# file) built in a uniquely named temporary sibling under a file lock and renamed into
# place, with ``checksums.json`` listing the sha256 and size of every file it holds. A
# load verifies the entry: sizes every time, full sha256 once per process (then size and
# mtime, so a chapter that reloads one model ten times hashes it once; see
# ``_VERIFIED``). A mismatch, truncation or missing file rebuilds the entry with one line
# saying why. Entries made before checksums existed are hashed once and adopted, with a
# line saying so (they were written atomically; damage before adoption is not detected).

CHECKSUMS = "checksums.json"
STALE_TEMPORARY_SECONDS = 24 * 3600
# path -> (size, mtime_ns) of files whose sha256 this process has checked
_VERIFIED: dict[str, tuple[int, int]] = {}


def _lock(target: Path):
    """An exclusive lock beside ``target`` (the hub's own cache uses the same package), held
    while the entry is built or replaced, so two processes never build one entry at once."""
    from filelock import FileLock

    return FileLock(str(target.parent / f".{target.name}.lock"))


def file_checksums(folder: Path) -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256", "bytes"}}`` for every file under ``folder`` but the
    checksum list itself."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel != CHECKSUMS:
            out[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def _file_problem(path: Path, sha256: str, size: int) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    stat = path.stat()
    if stat.st_size != size:
        return f"{path.name} has {stat.st_size} bytes, expected {size} (truncated or overwritten)"
    if _VERIFIED.get(str(path)) == (stat.st_size, stat.st_mtime_ns):
        return None
    if sha256_file(path) != sha256:
        return f"{path.name} fails its sha256 (damaged)"
    _VERIFIED[str(path)] = (stat.st_size, stat.st_mtime_ns)
    return None


def entry_problem(folder: Path) -> str | None:
    """Why the cache folder ``folder`` cannot be used (``None``: it verifies)."""
    if not folder.is_dir():
        return "not built yet"
    try:
        listed = json.loads((folder / CHECKSUMS).read_text())
    except FileNotFoundError:
        return "it has no checksums"
    except ValueError:
        return f"its {CHECKSUMS} is damaged"
    if not listed:
        return f"its {CHECKSUMS} lists no files"
    for rel, info in listed.items():
        problem = _file_problem(folder / rel, info["sha256"], info["bytes"])
        if problem:
            return problem
    return None


def _remove_stale_temporaries(parent: Path) -> None:
    """Temporary build folders and files older than a day belong to runs that were killed."""
    now = time.time()
    for path in parent.glob("*.tmp-*"):
        try:
            if now - path.stat().st_mtime > STALE_TEMPORARY_SECONDS:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError:  # another process removed it first
            pass


def _install(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; a folder already there (only ever a damaged one: a good
    one is returned before building) is renamed aside first, then removed."""
    if final.exists():
        aside = final.with_name(f"{final.name}.tmp-replaced-{os.getpid()}-{time.time_ns()}")
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True) if aside.is_dir() else aside.unlink(missing_ok=True)
    else:
        os.replace(tmp, final)


def _adopt(folder: Path) -> bool:
    """An entry made before checksums existed (a ``manifest.json``, no ``checksums.json``):
    hash it once and keep it, saying so."""
    if not (folder / "manifest.json").is_file() or (folder / CHECKSUMS).exists():
        return False
    print(f"cache entry {folder.name} predates checksums; hashing it once")
    write_atomic_text(folder / CHECKSUMS, json.dumps(file_checksums(folder), indent=1))
    return True


def cached_dir(final: Path, build: Callable[[Path], dict]) -> tuple[dict, bool]:
    """The verified cache folder ``final``, built by ``build(tmp)`` when it is missing or
    fails its checksums. ``build`` fills ``tmp`` and returns the entry's manifest (written
    as ``manifest.json``). Returns (manifest, whether it was built now)."""
    if entry_problem(final) is None:
        return json.loads((final / "manifest.json").read_text()), False
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final):
        if _adopt(final) or entry_problem(final) is None:  # adopted, or another process built it
            return json.loads((final / "manifest.json").read_text()), False
        problem = entry_problem(final)
        if problem != "not built yet":
            print(f"cache entry {final.name}: {problem}; building it again")
        return _build_dir(final, build), True


def _build_dir(final: Path, build: Callable[[Path], dict]) -> dict:
    _remove_stale_temporaries(final.parent)
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=final.parent))
    try:
        manifest = build(tmp)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        (tmp / CHECKSUMS).write_text(json.dumps(file_checksums(tmp), indent=1))
        _install(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def write_atomic_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _torch_safe_globals() -> list:
    """What a ``weights_only`` load may rebuild besides tensors: numpy arrays (chapter 02
    caches its choice log-likelihoods as arrays). No other class, so no code runs on load."""
    import numpy as np

    dtypes = [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int32", "int64", "bool", "uint8")]
    return [np._core.multiarray._reconstruct, np.ndarray, np.dtype, *dtypes]


def load_torch(path: Path) -> Any:
    """``torch.load`` that runs no code from the file: tensors, containers, numbers, strings
    and numpy arrays only."""
    import torch

    with torch.serialization.safe_globals(_torch_safe_globals()):
        return torch.load(path, weights_only=True)


def cached_torch(folder: str, key: str, build: Callable[[], Any]) -> tuple[Any, bool]:
    """``build()``'s result saved with ``torch.save`` under ``cache_dir(folder)``, named by
    the sha256 of ``key`` (which must name the inputs *and* the code that made it; see
    :func:`code_hash`), with a ``.sha256`` file beside it; loaded without running code
    (:func:`load_torch`) after its checksum is verified. Built under a lock into a unique
    temporary file and renamed; a damaged entry is rebuilt with a line saying why. Returns
    (the object, whether it came from the cache)."""
    import torch

    path = cache_dir(folder) / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.pt"
    check = path.with_name(path.name + ".sha256")

    def verified() -> tuple[Any, bool] | str:
        if not path.exists():
            return "not built yet"
        if not check.exists():
            return "it has no checksum"
        sha256, _, size = check.read_text().strip().partition(" ")
        problem = _file_problem(path, sha256, int(size or -1))
        if problem:
            return problem
        try:
            return load_torch(path), True
        except Exception as err:  # noqa: BLE001 - any load error means: build it again
            return f"it does not load ({type(err).__name__})"

    found = verified()
    if not isinstance(found, str):
        return found
    with _lock(path):
        if path.exists() and not check.exists():  # made before checksums: adopt it if it loads safely
            try:
                value = load_torch(path)
            except Exception as err:  # noqa: BLE001
                found = f"it does not load without running code ({type(err).__name__})"
            else:
                print(f"cache entry {path.name} predates checksums; hashing it once")
                write_atomic_text(check, f"{sha256_file(path)} {path.stat().st_size}\n")
                return value, True
        else:
            found = verified()
            if not isinstance(found, str):  # another process built it while this one waited
                return found
        if found != "not built yet":
            print(f"cache entry {path.name}: {found}; building it again")
        _remove_stale_temporaries(path.parent)
        value = build()
        fd, partial = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
        os.close(fd)
        torch.save(value, partial)
        write_atomic_text(check, f"{sha256_file(Path(partial))} {Path(partial).stat().st_size}\n")
        os.replace(partial, path)
        return value, False
