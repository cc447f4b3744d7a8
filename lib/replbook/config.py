"""The parameters cell, validated.

Each chapter declares its presets as a dict ``{preset: {parameter: default}}``;
every preset names the same parameters. A notebook's parameters cell sets
``preset`` and may override any parameter; ``None`` means "the preset's value".
Unknown presets or parameters, and values of the wrong type, fail at once with a
message naming the valid choices.

Beside its presets each chapter module declares ``parameter_rules()``: what every
parameter may be (a range, a non-empty list, members of a set, a registered
model) and the relations between parameters (``k`` ≤ ``n``). :func:`resolve`
checks them — in ``replbook run`` before a kernel starts, in the notebook before
any model loads — and a value that breaks one fails with one line naming the
parameter, the value and what is allowed. Rules never change a run they accept,
so neither the cache keys nor :func:`results.code_version` count them
(:func:`paths.without_parameter_rules`).
"""
from __future__ import annotations

import ast
import importlib
import math
import os
import random
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Mapping

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


class ParameterError(ValueError, TypeError):
    """A parameter value a chapter does not allow; the message is one line naming the
    parameter, the value and what is allowed. (A ``TypeError`` too: wrong types were.)"""


@dataclass(frozen=True)
class Rule:
    """What one parameter may be: ``allowed`` says it in words (or a function returning
    them, for choices defined further down a module), ``check(value, values)`` decides
    (``values``: every parameter of the run, ``preset`` included)."""

    allowed: str | Callable[[], str]
    check: Callable[[Any, Mapping[str, Any]], bool]

    def words(self) -> str:
        return self.allowed() if callable(self.allowed) else self.allowed

    def __or__(self, other: "Rule") -> "Rule":
        return Rule(lambda: f"{self.words()}, or {other.words()}",
                    lambda v, values: self.check(v, values) or other.check(v, values))


@dataclass(frozen=True)
class Relation:
    """A rule between parameters: ``check(values)`` over the named ones."""

    names: tuple[str, ...]
    allowed: str
    check: Callable[[Mapping[str, Any]], bool]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _range_words(minimum, maximum, above, below) -> str:
    parts = [f"≥ {minimum}" if minimum is not None else "", f"> {above}" if above is not None else "",
             f"≤ {maximum}" if maximum is not None else "", f"< {below}" if below is not None else ""]
    return " and ".join(p for p in parts if p)


def _in_range(v, minimum, maximum, above, below) -> bool:
    return ((minimum is None or v >= minimum) and (maximum is None or v <= maximum)
            and (above is None or v > above) and (below is None or v < below))


def integer(minimum: int | None = None, maximum: int | None = None, *, multiple_of: int | None = None) -> Rule:
    words = _range_words(minimum, maximum, None, None)
    words += f"{' and ' if words else ''}a multiple of {multiple_of}" if multiple_of else ""
    return Rule(f"an integer{' ' + words if words else ''}",
                lambda v, _: isinstance(v, int) and not isinstance(v, bool) and _in_range(v, minimum, maximum, None, None)
                and (not multiple_of or v % multiple_of == 0))


def number(minimum: float | None = None, maximum: float | None = None, *, above: float | None = None,
           below: float | None = None) -> Rule:
    words = _range_words(minimum, maximum, above, below)
    return Rule(f"a finite number{' ' + words if words else ''}",
                lambda v, _: _is_number(v) and _in_range(v, minimum, maximum, above, below))


def one_of(*choices: Any) -> Rule:
    """One of ``choices``; a single callable returning them is read when a value is checked."""
    def current():
        return tuple(choices[0]()) if len(choices) == 1 and callable(choices[0]) else choices

    return Rule(lambda: f"one of {', '.join(map(repr, current()))}", lambda v, _: v in current())


def at_paper(rule: Rule) -> Rule:
    """``rule``, allowed at the paper preset only."""
    return Rule(lambda: f"{rule.words()} (paper preset only)",
                lambda v, values: values.get("preset") == "paper" and rule.check(v, values))


def hub_id() -> Rule:
    """A hub model id, ``organisation/name``."""
    return Rule("a hub id like 'org/name'",
                lambda v, _: isinstance(v, str) and v.count("/") == 1 and all(v.split("/")))


def folder() -> Rule:
    return Rule("an existing folder", lambda v, _: isinstance(v, str) and bool(v) and os.path.isdir(v))


def _data_table(table: str) -> tuple:
    # imported by name: a chapter's code version follows import statements, and the choices
    # a rule reads do not make the chapter's numbers depend on the module
    return tuple(getattr(importlib.import_module("replbook.data"), table))


def data_name(table: str) -> Rule:
    """A name in ``replbook.data.<table>`` (``PHOTOS``)."""
    return Rule(lambda: f"one of {', '.join(map(repr, _data_table(table)))} (replbook.data.{table})",
                lambda v, _: v in _data_table(table))


def text_name() -> Rule:
    """A text ``replbook.data.text`` serves: the offline ones at every preset, the hub's at
    the paper preset only."""
    def offline():
        return tuple(t for t in _data_table("TEXTS") if t not in _data_table("HUB_TEXTS"))

    return Rule(lambda: f"one of {', '.join(map(repr, offline()))}, or at the paper preset "
                        f"{', '.join(map(repr, _data_table('HUB_TEXTS')))}",
                lambda v, values: v in offline() or (v in _data_table("HUB_TEXTS") and values.get("preset") == "paper"))


def flag() -> Rule:
    return Rule("True or False", lambda v, _: isinstance(v, bool))


def text(non_empty: bool = True) -> Rule:
    return Rule("a non-empty string" if non_empty else "a string",
                lambda v, _: isinstance(v, str) and (bool(v.strip()) or not non_empty))


def items(rule: Rule, *, min_items: int = 1, max_items: int | None = None, unique: bool = True,
          increasing: bool = False) -> Rule:
    """A list of ``min_items`` … ``max_items`` values, each satisfying ``rule``."""
    count = f"{min_items}{'' if max_items is None else f' to {max_items}'}{' or more' if max_items is None else ''}"
    extra = " in increasing order" if increasing else ""

    def check(v, values):
        if not isinstance(v, (list, tuple)) or len(v) < min_items or (max_items is not None and len(v) > max_items):
            return False
        if not all(rule.check(x, values) for x in v):
            return False
        if unique and len({repr(x) for x in v}) != len(v):
            return False
        return not increasing or all(a < b for a, b in zip(v, v[1:]))

    return Rule(lambda: f"a list of {count} {'distinct ' if unique else ''}items{extra}, each {rule.words()}", check)


def model(*kinds: str) -> Rule:
    """A name in the model registry of one of ``kinds``; at the smoke and book presets not a
    hub model (they run offline), though a local folder saved with ``save_pretrained`` is."""
    def check(v, values):
        if not isinstance(v, str):
            return False
        if os.path.isdir(v):
            return True
        # the registry is data in replbook.models; imported by name so that a chapter's code
        # version (results.code_version follows import statements) does not gain the module
        spec = importlib.import_module("replbook.models").REGISTRY.get(v)
        if spec is None or spec.kind not in kinds:
            return False
        return spec.source != "hub" or values.get("preset") == "paper"

    return Rule(f"a registered {' or '.join(kinds)} model (smoke and book: not a hub model; see "
                f"`replbook.models.REGISTRY`) or a saved model folder", check)


DEVICES = ("auto", "cpu", "cuda")


def device() -> Rule:
    """Where a run computes: ``auto`` (the GPU when there is one, else the CPU:
    :func:`run_device`), ``cpu``, or ``cuda`` on a machine that has a CUDA GPU."""
    def check(v, _):
        if v == "cuda":
            import torch

            return torch.cuda.is_available()
        return v in DEVICES

    return Rule("'auto' (the GPU when there is one), 'cpu', or 'cuda' on a machine with a CUDA GPU", check)


def run_device(device: str) -> str:
    """The device a run uses for ``device`` (a value :func:`device` accepts): ``auto`` is
    ``cuda`` when a CUDA GPU is present, else ``cpu``; the others are kept. One device, not
    Accelerate's ``device_map``: what a chapter trains must sit where its optimizer runs."""
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def relation(names: str, allowed: str, check: Callable[[Mapping[str, Any]], bool]) -> Relation:
    return Relation(tuple(n.strip() for n in names.split(",")), allowed, check)


def check_rules(rules: Mapping[str, Rule | Relation], values: Mapping[str, Any]) -> None:
    """Raise :class:`ParameterError` for the first parameter (or relation) ``values`` break."""
    for name, rule in rules.items():
        if isinstance(rule, Relation):
            continue
        if name not in values:
            raise ValueError(f"parameter_rules() names {name!r}, which is not a parameter")
        value = values[name]
        try:
            ok = rule.check(value, values)
        except Exception:  # noqa: BLE001 - a value a rule cannot even inspect breaks it
            ok = False
        if not ok:
            raise ParameterError(f"parameter {name}={value!r} is not allowed at the {values.get('preset')!r} "
                                 f"preset: it must be {rule.words()}")
    for rule in rules.values():
        if isinstance(rule, Relation):
            try:
                ok = rule.check(values)
            except Exception:  # noqa: BLE001
                ok = False
            if not ok:
                shown = ", ".join(f"{n}={values[n]!r}" for n in rule.names)
                raise ParameterError(f"parameters {shown} are not allowed together: {rule.allowed}")


def rules_for(presets: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Rule | Relation] | None:
    """The rules of the module that defines ``presets`` (its ``parameter_rules()``)."""
    import sys

    for module in list(sys.modules.values()):
        if getattr(module, "PRESETS", None) is presets and hasattr(module, "parameter_rules"):
            return module.parameter_rules()
    return None


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


def resolve(presets: Mapping[str, Mapping[str, Any]], preset: str, *,
            rules: Mapping[str, Rule | Relation] | None = None, **overrides: Any) -> Config:
    """Merge ``overrides`` into ``presets[preset]`` (``None`` keeps the preset's value) and
    check the result against ``rules`` (default: the ``parameter_rules()`` beside ``presets``)."""
    names = _check_presets(presets)
    if preset not in presets:
        raise ParameterError(f"preset={preset!r} is not valid; choose one of: {', '.join(PRESETS)}")
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
            raise ParameterError(
                f"parameter {key!r} must be {type(default).__name__} "
                f"(like the {preset!r} default {default!r}), got {type(value).__name__} {value!r}"
            )
        values[key] = float(value) if isinstance(default, float) else value
    values["preset"] = preset
    rules = rules if rules is not None else rules_for(presets)
    if rules is not None:
        check_rules(rules, values)
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
