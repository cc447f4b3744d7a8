"""The parameters cell, validated.

Each chapter declares its presets as a dict ``{preset: {parameter: default}}``;
every preset names the same parameters. A notebook's parameters cell sets
``preset`` and may override any parameter; ``None`` means "the preset's value".
Unknown presets or parameters, and values of the wrong type, fail at once with a
message naming the valid choices.
"""
from __future__ import annotations

import ast
import os
import random
from types import MappingProxyType
from typing import Any, Mapping

import numpy as np

PRESETS = ("smoke", "book", "paper")


class Config(Mapping[str, Any]):
    """Read-only parameters with attribute access: ``cfg.seed`` or ``cfg["seed"]``."""

    def __init__(self, values: Mapping[str, Any]):
        self._values = MappingProxyType(dict(values))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(
                f"no parameter {name!r}; valid: {', '.join(sorted(self._values))}"
            ) from None

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._values.items())
        return f"Config({inner})"


def _check_presets(presets: Mapping[str, Mapping[str, Any]]) -> list[str]:
    if set(presets) != set(PRESETS):
        raise ValueError(f"a chapter must define exactly the presets {PRESETS}, got {sorted(presets)}")
    names = [sorted(p) for p in presets.values()]
    if any(n != names[0] for n in names):
        raise ValueError("every preset must name the same parameters")
    return names[0]


def _type_ok(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def resolve(presets: Mapping[str, Mapping[str, Any]], preset: str, **overrides: Any) -> Config:
    """Merge ``overrides`` into ``presets[preset]``; ``None`` keeps the preset's value."""
    names = _check_presets(presets)
    if preset not in presets:
        raise ValueError(f"preset={preset!r} is not valid; choose one of: {', '.join(PRESETS)}")
    values = dict(presets[preset])
    for key, value in overrides.items():
        if key not in values:
            raise ValueError(
                f"unknown parameter {key!r}; valid parameters: preset, {', '.join(names)}"
            )
        if value is None:
            continue
        default = values[key]
        if not _type_ok(default, value):
            raise TypeError(
                f"parameter {key!r} must be {type(default).__name__} "
                f"(like the {preset!r} default {default!r}), got {type(value).__name__} {value!r}"
            )
        values[key] = float(value) if isinstance(default, float) else value
    values["preset"] = preset
    return Config(values)


def injected_names(history: list[str]) -> set[str]:
    """Names assigned in the last cell that papermill injected (it starts with
    ``# Parameters``), read from IPython's input history ``In``."""
    for source in reversed(history):
        if source.lstrip().startswith("# Parameters"):
            tree = ast.parse(source)
            return {
                t.id
                for node in tree.body
                if isinstance(node, ast.Assign)
                for t in node.targets
                if isinstance(t, ast.Name)
            }
    return set()


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and GPU)."""
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard requirement of the book
        return
    torch.manual_seed(seed)


def fix_threads(threads: int) -> None:
    """Fix the thread count: float sums depend on how work is split across threads."""
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)


def from_notebook(presets: Mapping[str, Mapping[str, Any]], namespace: Mapping[str, Any]) -> Config:
    """Validate a notebook's parameters cell and set seeds and threads.

    ``namespace`` is the notebook's ``globals()``. Names papermill injected that the
    chapter does not know fail here, as do unknown presets and wrong types.
    """
    names = _check_presets(presets)
    injected = injected_names(list(namespace.get("In", [])))
    unknown = sorted(injected - set(names) - {"preset"})
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))}; "
            f"valid parameters: preset, {', '.join(names)}"
        )
    if "preset" not in namespace:
        raise ValueError("the parameters cell must set preset")
    overrides = {k: namespace[k] for k in names if k in namespace}
    cfg = resolve(presets, namespace["preset"], **overrides)
    if "seed" in cfg:
        seed_everything(cfg.seed)
    if "threads" in cfg:
        fix_threads(cfg.threads)
    return cfg
