"""Verdicts from measured numbers, and the results file of a run.

A claim's verdict comes from *checks*: named booleans computed from the numbers
by a rule written before looking at them. All checks pass -> "reproduced"; some
-> "partly reproduced"; none -> "not reproduced". The results file
``results/<slug>.json`` is written atomically (temporary file + rename), so an
interrupted run never leaves a half-written one.
"""
from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from .paths import results_dir

REPRODUCED = "reproduced"
PARTLY = "partly reproduced"
NOT_REPRODUCED = "not reproduced"
VERDICTS = (REPRODUCED, PARTLY, NOT_REPRODUCED)
# how a verdict is shown on the site (symbols every common font has)
BADGE = {REPRODUCED: "✓ reproduced", PARTLY: "◐ partly reproduced", NOT_REPRODUCED: "✗ not reproduced"}

# what the results file records about the software that produced it
TRACKED_PACKAGES = ("torch", "transformers", "sentence-transformers", "numpy", "triton", "replbook")


@dataclass
class Verdict:
    claim: str  # "C1"
    statement: str  # the claim, stated so that it can fail
    checks: dict[str, bool]  # rule -> did the measurement satisfy it
    evidence: str = ""  # one or two sentences with the numbers

    @property
    def verdict(self) -> str:
        if not self.checks:
            raise ValueError(f"{self.claim}: a verdict needs at least one check")
        passed = sum(bool(v) for v in self.checks.values())
        if passed == len(self.checks):
            return REPRODUCED
        return PARTLY if passed else NOT_REPRODUCED

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "checks": {k: bool(v) for k, v in self.checks.items()},
                "verdict": self.verdict}

    def __str__(self) -> str:
        marks = "; ".join(f"{'✓' if ok else '✗'} {rule}" for rule, ok in self.checks.items())
        return f"{self.claim}: {self.verdict.upper()} — {marks}"


def judge(claim: str, statement: str, evidence: str = "", **checks: bool) -> Verdict:
    """``judge("C1", "...", top1_is_paris=..., margin_over_2=...)``."""
    return Verdict(claim, statement, dict(checks), evidence)


def versions(packages: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    out = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _clean(value: Any) -> Any:
    """JSON-safe: numpy scalars to python, NaN/inf to None, tuples to lists."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_atomic(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write JSON to ``path`` through a temporary file in the same folder + rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_clean(payload), f, indent=1, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@dataclass
class Run:
    """One run of a chapter: start it in the setup section, ``save`` it at the end."""

    slug: str  # the notebook's stem, e.g. "00_model_zoo"
    title: str
    config: Mapping[str, Any]
    started: float = field(default_factory=time.perf_counter)

    def save(self, verdicts: list[Verdict], metrics: Mapping[str, Any], folder: Path | None = None) -> Path:
        claims = [v.claim for v in verdicts]
        if len(set(claims)) != len(claims):
            raise ValueError(f"claims must be unique, got {claims}")
        payload = {
            "slug": self.slug,
            "title": self.title,
            "preset": self.config["preset"],
            "seed": self.config.get("seed"),
            "config": dict(self.config),
            "runtime_seconds": round(time.perf_counter() - self.started, 1),
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "versions": versions(),
            "verdicts": [v.as_dict() for v in verdicts],
            "metrics": metrics,
        }
        return write_atomic((folder or results_dir()) / f"{self.slug}.json", payload)


def at_a_glance(verdicts: list[Verdict]) -> str:
    """The chapter's at-a-glance box: one markdown row per claim."""
    lines = ["| Claim | Verdict | Statement |", "|---|---|---|"]
    for v in verdicts:
        statement = v.statement.replace("|", "\\|")
        lines.append(f"| {v.claim} | **{BADGE[v.verdict]}** | {statement} |")
    return "\n".join(lines)


def run_facts(saved: Mapping[str, Any], cold_seconds: float | None = None) -> str:
    """One line under the at-a-glance box: preset, runtime, machine, date of the saved run."""
    cold = f" ({cold_seconds:.0f} s from a cold cache)" if cold_seconds else ""
    return (f"Preset `{saved['preset']}` · {saved['runtime_seconds']:.0f} s with models cached{cold} · "
            f"{saved['machine']} · {saved['date']}")


def load_all(folder: Path | None = None) -> list[dict[str, Any]]:
    """Every ``*.json`` results file in the folder, sorted by slug."""
    folder = folder or results_dir()
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]


def mean_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """Mean and its two-sided t interval (over seeds, or over paired differences)."""
    import numpy as np
    from scipy import stats

    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    return mean, mean - half, mean + half
