"""Verdicts from measured numbers, and the results file of a run.

A claim's verdict comes from *checks*: named booleans computed from the numbers
by a rule written before looking at them, split into the decisive ones (the claim
itself) and supporting ones (see :class:`Verdict`). A run saves its verdicts and
metrics with the tolerance each metric may move by on a rerun (:func:`compare`
is the regression guard that reads them). Results are written atomically
(temporary file + rename) into the run's results folder; only ``replbook run``
moves a finished book or paper run into ``results/`` (see :mod:`replbook.cli`).
"""
from __future__ import annotations

import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

from .paths import results_dir

REPRODUCED = "reproduced"
PARTLY = "partly reproduced"
NOT_REPRODUCED = "not reproduced"
NOT_TESTABLE = "not testable here"
VERDICTS = (REPRODUCED, PARTLY, NOT_REPRODUCED, NOT_TESTABLE)
# how a verdict is shown on the site (symbols every common font has)
BADGE = {REPRODUCED: "✓ reproduced", PARTLY: "◐ partly reproduced", NOT_REPRODUCED: "✗ not reproduced",
         NOT_TESTABLE: "○ not testable here"}

# what the results file records about the software that produced it
TRACKED_PACKAGES = ("torch", "transformers", "sentence-transformers", "numpy", "triton", "replbook")


@dataclass
class Verdict:
    """A claim's verdict from its checks.

    ``decisive`` checks test the claim itself (at the paper's protocol); ``supporting``
    checks test its premises, side conditions or the book's own stricter variants. The
    rule: any decisive check fails -> "not reproduced", whatever the supporting ones say;
    all decisive pass and all supporting pass -> "reproduced"; all decisive pass and some
    supporting fail -> "partly reproduced". A claim this hardware cannot test has no
    decisive check and an ``untestable`` reason -> "not testable here" (its supporting
    checks are still shown). ``numbers`` are the measured quantities the decisive rule
    reads; the stability record reports their spread over seeds.
    """

    claim: str  # "C1"
    statement: str  # the claim, stated so that it can fail
    decisive: dict[str, bool]  # rule -> did the measurement satisfy it
    supporting: dict[str, bool] = field(default_factory=dict)
    evidence: str = ""  # one or two sentences with the numbers
    untestable: str = ""  # why this hardware cannot test the claim (then no decisive check)
    numbers: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        self.decisive = {k: bool(v) for k, v in self.decisive.items()}
        self.supporting = {k: bool(v) for k, v in self.supporting.items()}
        self.numbers = {k: _clean(v) for k, v in self.numbers.items()}
        if self.untestable and self.decisive:
            raise ValueError(f"{self.claim}: a claim with decisive checks is testable; drop untestable="
                             f"{self.untestable!r} or the decisive checks")
        if not self.untestable and not self.decisive:
            raise ValueError(f"{self.claim}: a verdict needs at least one decisive check "
                             f"(or untestable='the reason this hardware cannot test it')")
        overlap = set(self.decisive) & set(self.supporting)
        if overlap:
            raise ValueError(f"{self.claim}: checks {sorted(overlap)} are both decisive and supporting")

    @property
    def verdict(self) -> str:
        if self.untestable:
            return NOT_TESTABLE
        if not all(self.decisive.values()):
            return NOT_REPRODUCED
        return REPRODUCED if all(self.supporting.values()) else PARTLY

    @property
    def checks(self) -> dict[str, bool]:
        """Every check, decisive first."""
        return {**self.decisive, **self.supporting}

    def as_dict(self) -> dict[str, Any]:
        return {"claim": self.claim, "statement": self.statement, "decisive": dict(self.decisive),
                "supporting": dict(self.supporting), "evidence": self.evidence, "untestable": self.untestable,
                "numbers": dict(self.numbers), "verdict": self.verdict}

    def __str__(self) -> str:
        marks = [f"{'✓' if ok else '✗'} {rule} [decisive]" for rule, ok in self.decisive.items()]
        marks += [f"{'✓' if ok else '✗'} {rule}" for rule, ok in self.supporting.items()]
        if self.untestable:
            marks.insert(0, f"not testable here: {self.untestable}")
        return f"{self.claim}: {self.verdict.upper()} — {'; '.join(marks)}"


def judge(claim: str, statement: str, evidence: str = "", *, decisive: Mapping[str, bool] | None = None,
          supporting: Mapping[str, bool] | None = None, untestable: str = "",
          numbers: Mapping[str, float] | None = None) -> Verdict:
    """``judge("C1", "...", decisive={"top-1 is Paris": ...}, supporting={...}, numbers={...})``."""
    return Verdict(claim, statement, dict(decisive or {}), dict(supporting or {}), evidence, untestable,
                   dict(numbers or {}))


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


# ---------------------------------------------------------------- tolerances and the regression guard

def exact() -> dict[str, Any]:
    """The number must come back identical (counts, codecs, anything deterministic by design)."""
    return {"kind": "exact"}


def band(abs: float = 0.0, rel: float = 0.0) -> dict[str, Any]:  # noqa: A002 - the name reads best
    """A rerun may move the number by at most ``abs + rel × |committed|``."""
    if abs < 0 or rel < 0 or not math.isfinite(abs) or not math.isfinite(rel):
        raise ValueError(f"band(abs={abs!r}, rel={rel!r}): both must be finite and ≥ 0")
    return {"kind": "band", "abs": float(abs), "rel": float(rel)}


def ignored(why: str) -> dict[str, Any]:
    """Not compared (wall-clock timings, whether a cache was warm): say why."""
    if not why.strip():
        raise ValueError("ignored(why): say why the value is not compared")
    return {"kind": "ignored", "why": why}


_KINDS = ("exact", "band", "ignored")


def _pattern(glob: str) -> "re.Pattern[str]":
    # '*' matches anything (dots and [i] included); everything else literally, so
    # "load[*].cold_s" matches "load[0].cold_s"
    import re

    return re.compile("".join(".*" if ch == "*" else re.escape(ch) for ch in glob) + r"\Z")


def check_tolerances(tolerances: Mapping[str, Mapping[str, Any]]) -> list[list[Any]]:
    """Validate a chapter's ``{path pattern: tolerance}`` declaration; returns it as JSON rows."""
    if not tolerances:
        raise ValueError("tolerances: declare at least one pattern (e.g. {'*': results.band(rel=1e-4)})")
    rows = []
    for glob, spec in tolerances.items():
        if not isinstance(glob, str) or not glob:
            raise ValueError(f"tolerances: pattern {glob!r} must be a non-empty string")
        if not isinstance(spec, Mapping) or spec.get("kind") not in _KINDS:
            raise ValueError(f"tolerances[{glob!r}] = {spec!r}: use results.exact(), band(...) or ignored(...)")
        rows.append([glob, dict(spec)])
    return rows


def tolerance_for(path: str, rows: list[list[Any]]) -> dict[str, Any] | None:
    """The first declared pattern matching ``path`` inside the metrics (``load[0].cold_s``), or None."""
    for glob, spec in rows:
        if _pattern(glob).match(path):
            return spec
    return None


def _leaves(value: Any, path: str):
    if isinstance(value, Mapping):
        if not value:
            yield path, {}
        for k, v in value.items():
            yield from _leaves(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list):
        if not value:
            yield path, []
        for i, v in enumerate(value):
            yield from _leaves(v, f"{path}[{i}]")
    else:
        yield path, value


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _supporting_differences(claim: str, new: Mapping[str, bool], old: Mapping[str, bool],
                            rows: list[list[Any]]) -> list[str]:
    """A supporting check may differ only where the chapter declared it ``ignored`` (a check on
    wall-clock numbers, path ``verdicts.<claim>.supporting.<check>``); the set of checks may not."""
    if sorted(new) != sorted(old):
        return [f"verdicts.{claim}.supporting: checks {sorted(new)} ≠ committed {sorted(old)} (exact)"]
    problems = []
    for name in sorted(old):
        spec = tolerance_for(f"verdicts.{claim}.supporting.{name}", rows)
        if new[name] != old[name] and not (spec and spec["kind"] == "ignored"):
            problems.append(f"verdicts.{claim}.supporting.{name}: rerun {new[name]!r} ≠ committed {old[name]!r} (exact)")
    return problems


def compare(new: Mapping[str, Any], committed: Mapping[str, Any]) -> list[str]:
    """Every difference between a rerun's results and the committed ones that the committed
    file's tolerances do not allow: one line per difference naming the metric's path, both
    values and the tolerance. The config, each verdict, its decisive checks and its
    untestable reason must match exactly; a supporting check too, unless an ``ignored``
    pattern covers ``verdicts.<claim>.supporting.<check>`` (a check on wall-clock numbers,
    which flips with the machine's load; a flip that changes the verdict still fails). Each
    metric must stay within its tolerance; a metric no pattern covers is itself a failure."""
    rows = committed.get("tolerances")
    if not rows:
        return [f"{committed.get('slug')}: the committed results declare no tolerances"]
    problems = []
    if new.get("config") != committed.get("config"):
        problems.append(f"config: rerun {new.get('config')} ≠ committed {committed.get('config')} "
                        "(the comparison needs the same parameters)")
    old_v = {v["claim"]: v for v in committed.get("verdicts", [])}
    new_v = {v["claim"]: v for v in new.get("verdicts", [])}
    if sorted(old_v) != sorted(new_v):
        problems.append(f"verdicts: claims {sorted(new_v)} ≠ committed {sorted(old_v)} (exact)")
    for claim in sorted(set(old_v) & set(new_v)):
        for key in ("verdict", "decisive", "untestable"):
            if new_v[claim].get(key) != old_v[claim].get(key):
                problems.append(f"verdicts.{claim}.{key}: rerun {new_v[claim].get(key)!r} ≠ committed "
                                f"{old_v[claim].get(key)!r} (exact)")
        problems += _supporting_differences(claim, new_v[claim].get("supporting") or {},
                                            old_v[claim].get("supporting") or {}, rows)
    # patterns name paths inside the metrics ("load[*].cold_s"), and the numbers each decisive
    # rule reads as "verdicts.C1.<name>"; messages say "metrics.load[0].cold_s"
    old_leaves = dict(_leaves(committed.get("metrics", {}), ""))
    new_leaves = dict(_leaves(new.get("metrics", {}), ""))
    for source, leaves in ((old_v, old_leaves), (new_v, new_leaves)):
        for claim, v in source.items():
            leaves.update({f"verdicts.{claim}.{name}": value for name, value in v.get("numbers", {}).items()})
    for inner in sorted(set(old_leaves) | set(new_leaves)):
        path = inner if inner.startswith("verdicts.") else f"metrics.{inner}" if inner else "metrics"
        spec = tolerance_for(inner, rows)
        if spec is None:
            problems.append(f"{path}: no tolerance declared for it (add a pattern to the chapter's tolerances)")
            continue
        if spec["kind"] == "ignored":
            continue
        if inner not in new_leaves or inner not in old_leaves:
            where = "the rerun" if inner not in new_leaves else "the committed results"
            problems.append(f"{path}: missing from {where} (structure changed)")
            continue
        a, b = new_leaves[inner], old_leaves[inner]
        if spec["kind"] == "band" and _number(a) and _number(b):
            allowed = spec["abs"] + spec["rel"] * abs(b)
            if not abs(a - b) <= allowed:
                problems.append(f"{path}: rerun {a!r} vs committed {b!r}, |Δ| = {abs(a - b):.3g} > "
                                f"{allowed:.3g} (band abs={spec['abs']:g}, rel={spec['rel']:g})")
        elif a != b or type(a) is not type(b) and not (_number(a) and _number(b)):
            problems.append(f"{path}: rerun {a!r} vs committed {b!r} ({spec['kind']})")
    return problems


# ---------------------------------------------------------------- which code a chapter's verdicts rest on

# modules that run a chapter but decide none of its numbers: a change here does not
# make a chapter's stability record stale (the regression guard still covers them)
INFRASTRUCTURE = frozenset({"config", "paths", "results", "plotting", "scoreboard", "cli"})


def _replbook_imports(tree) -> set[str]:
    import ast

    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:  # from .x import y
                names.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import x, y
                names.update(a.name for a in node.names)
            elif node.module == "replbook":
                names.update(a.name for a in node.names)
            elif node.module and node.module.startswith("replbook."):
                names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("replbook."))
    return names


def method_modules(notebook: Path, package: Path | None = None) -> list[str]:
    """The ``replbook`` modules a chapter's notebook reaches (imports, followed through the
    package), less :data:`INFRASTRUCTURE`: the code its measurements and rules depend on.
    ``package`` is the folder of the package's sources (default: this one)."""
    import ast

    import nbformat

    package = Path(package or Path(__file__).parent)
    nb = nbformat.read(notebook, as_version=4)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code"
                       and "injected-parameters" not in c.metadata.get("tags", []))
    todo = _replbook_imports(ast.parse(_strip_magics(source)))
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or not (package / f"{name}.py").exists():
            continue
        seen.add(name)
        todo |= _replbook_imports(ast.parse((package / f"{name}.py").read_text()))
    return sorted(seen - INFRASTRUCTURE)


def _strip_magics(source: str) -> str:
    return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())


def source_version(slug: str, root: Path | None = None, package: Path | None = None) -> str:
    """sha256 (16 hex) of what decides a chapter's numbers and verdicts: its notebook's code
    cells (papermill's injected parameters excluded; outputs never count) and the source of
    :func:`method_modules` (less their ``parameter_rules``, which never change an accepted
    run: :func:`paths.without_parameter_rules`). :func:`code_version` is this, unless a
    proven refactor (:data:`REFACTORS`) says these sources give an older version's numbers."""
    import hashlib

    import nbformat

    from .paths import repo_root, without_parameter_rules

    notebook = (root or repo_root()) / "notebooks" / f"{slug}.ipynb"
    nb = nbformat.read(notebook, as_version=4)
    digest = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code" and "injected-parameters" not in cell.metadata.get("tags", []):
            digest.update(cell.source.encode() + b"\0")
    package = Path(package or Path(__file__).parent)
    for name in method_modules(notebook, package):
        source = (package / f"{name}.py").read_bytes().decode()
        digest.update(name.encode() + b"\0" + without_parameter_rules(source).encode())
    return digest.hexdigest()[:16]


# A change to code the chapters share that cannot move a number — how a cache entry is
# verified, where an archive is fetched from, code moved between modules — still changes every
# reaching chapter's source version, and with it every record made under the old one: the
# stability records (seeds rerun), the by-hand reruns, the guard proofs, the paper dry runs
# (which need a GPU) and, for a chapter whose numbers depend on the CPU family, the other
# family's reference (which needs a machine of that family: a session has one). Such a change
# is recorded here instead, per chapter: the chapter re-executed under the new sources on this
# machine, under nbval (every cell) and the regression guard (every number against its own
# family's), and both passed. Then the chapter's code version stays the one its records were
# made under (``holds``), for as long as its sources are exactly those (``from``): the next
# change of them is a new version again, or needs its own proof. What it assumes, as a
# stability carry-forward does for the other seeds: that the other family's numbers did not
# move either (a chapter without CPU-dependent numbers is held to one set on every family; CI
# re-executes the chapters it can on whichever family it runs on). `make refactor-proof`
# records it; tests/test_regression.py holds every entry to the chapter's sources and results.
REFACTORS = Path("results") / "guard" / "refactors.json"


def refactors(root: Path | None = None) -> dict[str, dict[str, Any]]:
    from .paths import repo_root

    path = (root or repo_root()) / REFACTORS
    return json.loads(path.read_text()) if path.exists() else {}


def refactor_proven(entry: Mapping[str, Any]) -> bool:
    """Every cell passed under nbval and the guard found nothing: the rerun gave the numbers."""
    return entry.get("cells_failed") == 0 and entry.get("cells_passed", 0) > 0 and entry.get("guard_problems") == []


def begin_refactor(slugs: list[str], why: str, root: Path | None = None) -> Path:
    """Before the proving reruns: an entry per chapter marked ``proving``, under which its
    sources already give the held version, so that each rerun's verdict section reads the
    chapter's records as current, as the committed notebook did (a stability carry-forward
    marks its record current while it runs, for the same reason). The rerun replaces it with
    its outcome (tests/test_regression.py); one left ``proving`` fails the tests.

    The entry's ``why`` keeps the whys of the proven refactors the held version already went
    through (``earlier``), joined with "; then ": a chapter's record says every change its
    version was carried across, not only the last. A retried or redone proof of the same
    sources replaces its own why, not that history."""
    from .paths import repo_root

    root = root or repo_root()
    if not why.strip():
        raise ValueError("why='': say what the refactor changed")
    record = refactors(root)
    for slug in slugs:
        held = json.loads((root / "results" / f"{slug}.json").read_text())["code_version"]
        sources = source_version(slug, root)
        if sources != held:
            earlier = _refactor_history(record.get(slug), sources, held)
            record[slug] = {"from": sources, "holds": held, "why": "; then ".join(filter(None, (earlier, why.strip()))),
                            "earlier": earlier, "proving": True}
        else:
            record.pop(slug, None)
    (root / REFACTORS).parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(root / REFACTORS, record)


def _refactor_history(entry: Mapping[str, Any] | None, sources: str, held: str) -> str:
    """The whys a new refactor proof of ``sources`` carries forward from the chapter's entry:
    none where the entry holds another version (the records moved since); its ``earlier`` where
    it is a proof of these same sources or one still ``proving`` (a retry); else its whole why."""
    if not entry or entry.get("holds") != held:
        return ""
    if entry.get("proving") or entry.get("from") == sources:
        return entry.get("earlier", "")
    return entry.get("why", "")


def code_version(slug: str, root: Path | None = None, package: Path | None = None) -> str:
    """The chapter's code version: :func:`source_version`, or the version its records were made
    under where a proven refactor (:data:`REFACTORS`) is recorded for exactly these sources
    (or one is being proven: :func:`begin_refactor`). Results and stability records carry it,
    so a record made before the chapter's rule or method changed is detected as stale."""
    sources = source_version(slug, root, package)
    entry = refactors(root).get(slug)
    if entry and entry.get("from") == sources and (refactor_proven(entry) or entry.get("proving")):
        return entry["holds"]
    return sources


@dataclass
class Run:
    """One run of a chapter: start it in the setup section, ``save`` it at the end."""

    slug: str  # the notebook's stem, e.g. "00_model_zoo"
    title: str
    config: Mapping[str, Any]
    started: float = field(default_factory=time.perf_counter)

    def save(self, verdicts: list[Verdict], metrics: Mapping[str, Any],
             tolerances: Mapping[str, Mapping[str, Any]], folder: Path | None = None) -> Path:
        """Write ``<folder>/<slug>.json`` (default: :func:`paths.results_dir`). ``tolerances``
        maps path patterns of ``metrics`` (``"load[*].cold_s"``, first match wins) to
        :func:`exact`, :func:`band` or :func:`ignored`: what a rerun may change."""
        from .paths import repo_root

        claims = [v.claim for v in verdicts]
        if len(set(claims)) != len(claims):
            raise ValueError(f"claims must be unique, got {claims}")
        rows = check_tolerances(tolerances)
        folder = Path(folder or results_dir())
        try:
            published = (repo_root() / "results").resolve()
        except FileNotFoundError:  # a run outside the repository
            published = None
        if folder.resolve() == published:
            raise RuntimeError(
                f"a run never writes {published} itself: `replbook run` moves a finished book or paper "
                "run there (point REPLBOOK_RESULTS_DIR elsewhere, or leave it unset to write under runs/)")
        try:
            version = code_version(self.slug)
        except FileNotFoundError:
            version = None
        payload = {
            "slug": self.slug,
            "title": self.title,
            "preset": self.config["preset"],
            "seed": self.config.get("seed", self.config.get("seeds")),
            "config": dict(self.config),
            "code_version": version,
            "runtime_seconds": round(time.perf_counter() - self.started, 1),
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "versions": versions(),
            "verdicts": [v.as_dict() for v in verdicts],
            "metrics": metrics,
            "tolerances": rows,
        }
        return write_atomic(folder / f"{self.slug}.json", payload)


# ---------------------------------------------------------------- the chapter's boxes

def load_stability(slug: str, root: Path | None = None) -> dict[str, Any] | None:
    """The chapter's verdict-stability record (``results/stability/<slug>.json``), or None."""
    from .paths import repo_root

    path = (root or repo_root()) / "results" / "stability" / f"{slug}.json"
    return json.loads(path.read_text()) if path.exists() else None


def stability_claims(runs: list[Mapping[str, Any]]) -> dict[str, Any]:
    """Per claim over a stability record's runs (each ``{"index", "verdicts": {claim: verdict},
    "numbers": {claim: {name: value}}}``, index 0 the committed seed): the count of each
    verdict, the committed seed's verdict, and the spread of each number its decisive rule reads."""
    claims: dict[str, Any] = {}
    for entry in runs:
        for claim, verdict in entry["verdicts"].items():
            c = claims.setdefault(claim, {"counts": {}, "numbers": {}, "committed": None})
            c["counts"][verdict] = c["counts"].get(verdict, 0) + 1
            if entry.get("index") == 0:
                c["committed"] = verdict
            for name, value in entry["numbers"].get(claim, {}).items():
                c["numbers"].setdefault(name, []).append(value)
    for c in claims.values():
        spread = {}
        for name, values in c["numbers"].items():
            finite = [v for v in values if _number(v)]
            spread[name] = {"values": values, "min": min(finite) if finite else None,
                            "max": max(finite) if finite else None,
                            "mean": sum(finite) / len(finite) if finite else None}
        c["numbers"] = spread
    return claims


def with_this_run(record: Mapping[str, Any], verdicts: list[Verdict]) -> dict[str, Any]:
    """The record with its committed-seed entry replaced by this run's verdicts: the chapter
    being executed *is* the committed seed's run (see :func:`replbook.stability.run`)."""
    this = {"index": 0, "verdicts": {v.claim: v.verdict for v in verdicts},
            "numbers": {v.claim: dict(v.numbers) for v in verdicts}}
    runs = [this] + [r for r in record["runs"] if r.get("index") != 0]
    return {**record, "seeds": [r["index"] for r in runs], "runs": runs, "claims": stability_claims(runs)}


def stability_current(record: Mapping[str, Any] | None, slug: str, root: Path | None = None) -> bool:
    return bool(record) and record.get("code_version") == code_version(slug, root)


def agreement(record: Mapping[str, Any] | None, claim: str, verdict: str) -> str:
    """"1/3": how many seeds of the record gave ``verdict`` (the published one), out of all
    its seeds; "—" without a record. Never the count of the commonest verdict: a verdict
    that one seed in three gave must not be printed beside "2/3"."""
    if not record or claim not in record.get("claims", {}):
        return "—"
    counts = record["claims"][claim]["counts"]
    return f"{counts.get(verdict, 0)}/{sum(counts.values())}"


def at_a_glance(verdicts: list[Verdict], stability: Mapping[str, Any] | None = None) -> str:
    """The chapter's at-a-glance box: one markdown row per claim, with how many seeds of the
    stability record gave the verdict shown (— where no current record exists)."""
    lines = ["| Claim | Verdict | Seeds agree | Statement |", "|---|---|---|---|"]
    for v in verdicts:
        statement = v.statement.replace("|", "\\|")
        lines.append(f"| {v.claim} | **{BADGE[v.verdict]}** | {agreement(stability, v.claim, v.verdict)} | {statement} |")
    return "\n".join(lines)


def stability_note(verdicts: list[Verdict], stability: Mapping[str, Any] | None, current: bool = True) -> str:
    """One paragraph for the verdict section and "How to read": how stable each verdict is
    over the seeds of the record, computed from it (never typed)."""
    if not stability:
        return ("**Stability over seeds:** no record yet for this chapter (`replbook stability NN "
                "--seeds 3` makes one); each verdict above rests on one seed.")
    if not current:
        return ("**Stability over seeds:** the record in `results/stability/` was made before the chapter's "
                "rule or method last changed, so it is not shown; rerun `replbook stability`.")
    seeds = ", ".join(str(s) for s in stability["seeds"])
    parts, unsettled = [], []
    for v in verdicts:
        entry = stability["claims"].get(v.claim)
        if not entry:
            parts.append(f"{v.claim} (not in the record)")
            continue
        counts = entry["counts"]
        total = sum(counts.values())
        spread = ", ".join(f"{n} {BADGE[verdict]}" for verdict, n in sorted(counts.items(), key=lambda x: -x[1]))
        parts.append(f"{v.claim} {BADGE[v.verdict]} · {counts.get(v.verdict, 0)}/{total} seeds agree"
                     + ("" if len(counts) == 1 else f" ({spread})"))
        if len(counts) > 1:
            unsettled.append(v.claim)
    text = f"**Stability over {len(stability['seeds'])} seeds** ({seeds}; `results/stability/`): " + "; ".join(parts) + "."
    if unsettled:
        text += (f" Seeds disagree on {', '.join(unsettled)}: read {'that verdict' if len(unsettled) == 1 else 'those verdicts'}"
                 " as unsettled at this scale, whatever this run's seed gave.")
    else:
        text += " Every verdict came out the same on every seed."
    spreads = [n for entry in stability["claims"].values() for n in entry.get("numbers", {}).values()
               if n.get("min") is not None]
    if spreads and all(n["min"] == n["max"] for n in spreads):
        text += " No number a decisive rule reads moved between seeds: these measurements do not depend on the seed."
    return text


def verdict_boxes(slug: str, verdicts: list[Verdict], root: Path | None = None) -> tuple[str, str]:
    """The at-a-glance box and the stability paragraph of a chapter's verdict section, read
    from its stability record when that record is current (made with this code version)."""
    record = load_stability(slug, root)
    current = stability_current(record, slug, root)
    if current:
        record = with_this_run(record, verdicts)
    return at_a_glance(verdicts, record if current else None), stability_note(verdicts, record, current)


def run_facts(saved: Mapping[str, Any], cold_seconds: float | None = None) -> str:
    """One line under the at-a-glance box: preset, runtime, machine, date of the saved run."""
    cold = f" ({cold_seconds:.0f} s from a cold cache)" if cold_seconds else ""
    return (f"Preset `{saved['preset']}` · {saved['runtime_seconds']:.0f} s with models cached{cold} · "
            f"{saved['machine']} · {saved['date']}")


def load_all(folder: Path | None = None) -> list[dict[str, Any]]:
    """Every ``*.json`` results file in the folder (default: the published ``results/``), sorted by slug."""
    from .paths import repo_root

    folder = folder or repo_root() / "results"
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
