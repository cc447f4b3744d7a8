"""Which machines sum floats alike, and which committed numbers a rerun on this one must give.

A rerun gives the committed numbers bit for bit only where torch, oneDNN and MKL add floats
in the same order as on the machine that made them. The CPU pins (``runner.CPU_PINS``) tie
CPUs of one vendor together (a Zen 4 retrained chapter 09 into the numbers a Zen 2 machine
committed). They cannot tie Intel to AMD: MKL picks its matrix-product code by vendor, and
its one mode that gives the same sums on both (``MKL_CBWR=COMPATIBLE``) is SSE2 code that
would slow every chapter and change every committed number. Small models trained on the CPU
then carry a last-bit difference into other weights: on an Intel Xeon (2026-12) chapters 03,
04, 05, 06, 08 and 09 came out beyond their tolerances (05's FID-style distances by 5–10 %),
and, rerun there on a fresh cache under later code (2026-12-05), so did 10 (172 numbers of its
training curves) and 01 (two greedy continuations); 00, 02 and 07 gave the committed numbers.

So the book records which **numerics family** each chapter's published results come from
(``results/reference/published.json``: CPU architecture, vendor and whether the pins were in
force), and for a chapter whose numbers differ on another family, that family's own rerun of
the same code under ``results/reference/<family>/<slug>.json``: its results and the text
outputs nbval compares. ``replbook reference NN``, run on a machine of that family, makes
one. The regression guard and nbval then hold a rerun to the numbers of its own family —
exactly as tightly as on the published one; a chapter with no reference for this family is
held to the published numbers (right for the chapters whose numbers do not depend on it).

A session has one machine, of one family. When it publishes a family-dependent chapter under
changed code, the other family's reference no longer describes that code, and only a machine
of that family can record a new one. Until then the family is **pending** for the chapter: its
reference file becomes a pending record (:func:`record_publication`) that holds what the two
families' last runs of the same code showed about how far they lie apart. On a pending family
the guard holds a rerun to the published **verdicts** exactly and to each number within its
tolerance widened by twice the measured cross-family move (what the new code added or changed
is not compared there: :func:`pending_view`); nbval runs every cell but compares no outputs. ``replbook reference NN`` on that family ends the wait.

One vendor's CPUs do not always sum alike either. Chapter 03's CoOp runs on CIFAR-10 gave
eight numbers 0.013–0.027 apart on an AMD EPYC Zen 4 (family 25, model 17) and on a Zen 3
(family 25, model 1), both pinned, each run deterministic (2026-12-04: the cold CI run of
8bc2543 failed there). MKL ignores ``MKL_ENABLE_INSTRUCTIONS`` on AMD (the same sums under
AVX2, AVX512 and SSE4_2 caps, measured) and oneDNN reports AVX2 under the pin, so the
likely cause is what neither pin fixes: blocking chosen from the cache sizes (Zen 4 has
twice Zen 3's L2); not proven. Such a chapter gets a reference for one **CPU model** of a
family, ``results/reference/<family>@f<cpu family>m<model>/<slug>.json``
(``replbook reference NN --cpu-model``), which a machine of that model is held to in
place of its family's numbers; every other model of the family keeps the family's.
Under changed code such a record turns pending like a family's (:func:`record_publication`).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import time
from pathlib import Path
from typing import Any

from . import results
from .paths import repo_root

# the pins a book run sets (runner.CPU_PINS repeats them for the kernel: test_numerics holds
# the two to each other); a family is "pinned" only when all three hold these values
PINS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
VENDORS = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}
# the families the book's machines (and CI's) come in: a chapter whose numbers depend on the
# family must have numbers for each of them, published or as a reference
KNOWN_FAMILIES = ("x86_64-amd", "x86_64-intel")
# outputs nbval never compares (nbval's own skip list): left out of a reference
IMAGE_TYPES = ("image/png", "image/jpeg", "image/svg+xml")


def cpu_vendor(cpuinfo: str | None = None) -> str:
    """``intel``, ``amd``, another vendor's id in lower case, or ``unknown``."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return "unknown"
    for line in cpuinfo.splitlines():
        if line.startswith("vendor_id"):
            vendor = line.split(":", 1)[1].strip()
            return VENDORS.get(vendor, vendor.lower() or "unknown")
    return "unknown"


def _cpu_fields(cpuinfo: str | None) -> dict[str, str] | None:
    """The first CPU's fields in /proc/cpuinfo (or ``cpuinfo``), None where it cannot be read."""
    try:
        cpuinfo = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if ":" in line:
            key, value = (part.strip() for part in line.split(":", 1))
            fields.setdefault(key, value)
    return fields


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name and family/model numbers, for the record (not part of the family)."""
    fields = _cpu_fields(cpuinfo)
    if fields is None:
        return platform.processor() or "unknown"
    return f"{fields.get('model name', 'unknown')} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


def cpu_variant(cpuinfo: str | None = None) -> str:
    """This CPU's family and model numbers as a tag, e.g. ``f25m17`` (AMD Zen 4): what a
    reference for one CPU model of a numerics family is filed under."""
    fields = _cpu_fields(cpuinfo) or {}
    return f"f{fields.get('cpu family', '?')}m{fields.get('model', '?')}"


def variant_name(family_name: str, variant: str) -> str:
    """Where one CPU model's numbers of a family are filed: ``x86_64-amd@f25m17``."""
    return f"{family_name}@{variant}"


def recorded_variant(record: dict) -> str | None:
    """The CPU model a reference was made on (its ``cpu`` field), as a :func:`cpu_variant` tag."""
    found = re.search(r"\(family (\d+), model (\d+)\)", record.get("cpu", ""))
    return f"f{found[1]}m{found[2]}" if found else None


def reference_name(slug: str, family_name: str, root: Path | None = None, variant: str | None = None) -> str:
    """The record a machine of ``family_name`` and CPU model ``variant`` (this machine's when
    None) is held to: its model's own (``family@variant``) where one exists, else its family's.
    A ``family_name`` that names a model already is taken as it is; ``variant=""`` asks for the
    family's record alone."""
    if "@" in family_name or variant == "":
        return family_name
    own = variant_name(family_name, variant or cpu_variant())
    return own if reference_path(slug, own, root).exists() else family_name


def family(environ: dict[str, str] | None = None, machine: str | None = None, cpuinfo: str | None = None) -> str:
    """This machine's numerics family, e.g. ``x86_64-amd`` or ``x86_64-intel``; ``-unpinned``
    is appended on x86 when the instruction-set pins are not all in force (a reader's override)."""
    environ = os.environ if environ is None else environ
    machine = machine or platform.machine()
    if machine not in ("x86_64", "AMD64"):
        return machine.lower()
    name = f"x86_64-{cpu_vendor(cpuinfo)}"
    if any(environ.get(key) != value for key, value in PINS.items()):
        name += "-unpinned"
    return name


# ------------------------------------------------------------------ the records


def reference_dir(root: Path | None = None) -> Path:
    return (root or repo_root()) / "results" / "reference"


def published_families(root: Path | None = None) -> dict[str, str]:
    path = reference_dir(root) / "published.json"
    return json.loads(path.read_text()) if path.exists() else {}


def published_family(slug: str, root: Path | None = None) -> str:
    families = published_families(root)
    if slug not in families:
        raise KeyError(f"results/reference/published.json names no family for {slug}: say which machine made "
                       f"results/{slug}.json (`replbook run` records it when it publishes)")
    return families[slug]


def family_dependent(root: Path | None = None) -> list[str]:
    """The chapters whose numbers were seen to differ between families (``replbook reference``
    adds one when its rerun moved a number beyond tolerance)."""
    path = reference_dir(root) / "family_dependent.json"
    return json.loads(path.read_text())["chapters"] if path.exists() else []


def mark_family_dependent(slug: str, root: Path | None = None) -> None:
    chapters = sorted(set(family_dependent(root)) | {slug})
    results.write_atomic(reference_dir(root) / "family_dependent.json", {
        "why": "a rerun of these chapters on another numerics family moved numbers beyond their tolerances: each "
               "needs its numbers on every family in numerics.KNOWN_FAMILIES, published or as a reference",
        "chapters": chapters})


def missing_families(slug: str, root: Path | None = None) -> list[str]:
    """For a family-dependent chapter, the known families with neither its published results
    nor a current reference (each needs `replbook reference` on such a machine)."""
    if slug not in family_dependent(root):
        return []
    root = root or repo_root()
    version = json.loads((root / "results" / f"{slug}.json").read_text()).get("code_version")
    covered = {published_family(slug, root)}
    for name in KNOWN_FAMILIES:
        path = reference_path(slug, name, root)
        if path.exists() and json.loads(path.read_text()).get("code_version") == version:
            covered.add(name)  # its own numbers, or a current pending record
    return [name for name in KNOWN_FAMILIES if name not in covered]


def pending_families(slug: str, root: Path | None = None) -> dict[str, str]:
    """The families waiting for their own numbers of ``slug``'s current code: family -> since when."""
    waiting = {}
    for path in sorted(reference_dir(root).glob(f"*/{slug}.json")):
        record = json.loads(path.read_text())
        if record.get("pending"):
            waiting[path.parent.name] = record.get("since", "?")
    return waiting


def reference_path(slug: str, family_name: str, root: Path | None = None) -> Path:
    return reference_dir(root) / family_name / f"{slug}.json"


def comparable_outputs(notebook) -> list[dict[str, Any]]:
    """Per code cell: a digest of its source and the outputs nbval compares (images left out)."""
    cells = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        outputs = []
        for output in cell.get("outputs", []):
            output = json.loads(json.dumps(output))  # a plain copy
            if "data" in output:
                output["data"] = {k: v for k, v in output["data"].items() if k not in IMAGE_TYPES}
            outputs.append(output)
        cells.append({"source_sha": source_digest(cell.source), "outputs": outputs})
    return cells


def source_digest(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def write_reference(slug: str, family_name: str, run_results: dict, notebook, root: Path | None = None,
                    cpu: str | None = None) -> Path:
    """Record ``run_results`` and ``notebook``'s comparable outputs as ``family_name``'s reference."""
    payload = {"slug": slug, "family": family_name, "code_version": run_results.get("code_version"),
               "cpu": cpu or cpu_model(), "date": time.strftime("%Y-%m-%d"),
               "results": run_results, "cells": comparable_outputs(notebook)}
    path = reference_path(slug, family_name, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    return results.write_atomic(path, payload)


# ------------------------------------------------------------------ a family waiting for its numbers

# how many times its measured cross-family move a number may move beyond its tolerance on a
# pending family: one pair of runs gives one sample of the move, not a bound (set before any
# pending family was checked against it)
PENDING_MARGIN = 2.0


def _first_pattern(path: str, rows: list) -> str | None:
    """The tolerance pattern ``results.compare`` applies to ``path`` (the first that matches)."""
    return next((glob for glob, spec in rows if results.tolerance_for(path, [[glob, spec]]) is not None), None)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _comparable_leaves(run: dict) -> dict[str, Any]:
    """What ``results.compare`` holds a rerun to, by the path its tolerance patterns see: each
    metric, each number a verdict's rule read (``verdicts.C1.<name>``) and each of its checks
    (``verdicts.C1.decisive.<check>``, ``verdicts.C1.supporting.<check>``)."""
    leaves = dict(results._leaves(run.get("metrics", {}), ""))  # noqa: SLF001 - the guard's own walk
    for verdict in run.get("verdicts", []):
        claim = verdict["claim"]
        leaves.update({f"verdicts.{claim}.{name}": value for name, value in (verdict.get("numbers") or {}).items()})
        for kind in ("decisive", "supporting"):
            if isinstance(verdict.get(kind), dict):
                leaves.update({f"verdicts.{claim}.{kind}.{name}": value for name, value in verdict[kind].items()})
    return leaves


def cross_family_moves(one: dict, other: dict) -> dict:
    """How far two families' runs of the same code lie apart, as :func:`pending_view` reads it:
    each number's |Δ|, and the paths of the other values (and the checks) that were the same
    and that differed."""
    a, b = _comparable_leaves(one), _comparable_leaves(other)
    numbers, same, differed = {}, [], []
    for path in sorted(set(a) & set(b)):
        x, y = a[path], b[path]
        if _is_number(x) and _is_number(y):
            numbers[path] = abs(x - y)
        else:
            (same if x == y else differed).append(path)
    return {"numbers": numbers, "same": same, "differed": differed}


def _pending_tolerance(path: str, value: Any, rows: list, moves: dict) -> dict | None:
    """What a pending family's rerun may do to one published value (None: what the
    committed tolerances say)."""
    glob = _first_pattern(path, rows)
    spec = dict(rows)[glob] if glob is not None else None
    if spec is None or spec["kind"] == "ignored":
        return None  # no pattern: compare reports it
    if _is_number(value):
        if path not in moves.get("numbers", {}):
            return results.ignored("not computed alike by both numerics families' last runs")
        move = moves["numbers"][path]
        base = spec if spec["kind"] == "band" else results.band()
        return results.band(abs=base["abs"] + PENDING_MARGIN * move, rel=base["rel"]) if move > 0 else None
    if path not in moves.get("same", []):
        return results.ignored("differed between the numerics families, or is new since")
    return None


def pending_view(committed: dict, rerun: dict, moves: dict) -> dict:
    """The published results as a pending family's rerun is compared with them
    (``results.compare``). Verdicts, claims and config stay exact. Each number is held within
    its tolerance plus ``PENDING_MARGIN`` × the move measured for it between the families;
    each other value and each check only where the families gave it alike. What the
    families' last runs did not both compute — a number or check the new code added, or
    changed (:func:`still_measured`) — is not compared here: which way the families' sums move
    it is unknown, and the published family's guard holds it."""
    rows = committed["tolerances"]
    widened = []
    for path, value in sorted(_comparable_leaves(committed).items()):
        if path.startswith("verdicts.") and (".decisive." in path or ".supporting." in path):
            continue  # checks: below
        spec = None if "*" in path else _pending_tolerance(path, value, rows, moves)  # '*' cannot be matched alone
        if spec is not None:
            widened.append([path, spec])
    view = json.loads(json.dumps(committed))
    view["tolerances"] = widened + rows
    reran = {v["claim"]: v for v in rerun.get("verdicts", [])}
    same = set(moves.get("same", []))
    for verdict in view.get("verdicts", []):
        for kind in ("decisive", "supporting"):
            checks, theirs = verdict.get(kind), (reran.get(verdict["claim"]) or {}).get(kind)
            if isinstance(checks, dict) and isinstance(theirs, dict):
                for name in checks:
                    if f"verdicts.{verdict['claim']}.{kind}.{name}" not in same and name in theirs:
                        checks[name] = theirs[name]  # not compared: the rerun's own
    return view


def _record_of(path: str) -> str:
    """The record a value belongs to: its path less the last key or index."""
    return re.sub(r"(\[\d+\]|\.[^.\[]+)$", "", path)


def still_measured(moves: dict, published: dict, previous: dict, same_family: bool) -> dict:
    """``moves`` less what a code change changed. ``previous`` is the run ``published``
    replaces: the publishing family's own run of the old code (``same_family``: a value
    counts as unchanged within its declared tolerance) or, failing that, the other family's
    (within the band a pending family is held to). A value that changed is a new computation,
    whose move between the families is unknown, and so is every value of the same record (a
    row of a table, a list, a claim's numbers): a table whose rows moved, or a list computed
    otherwise, can leave one value equal by coincidence."""
    rows = previous.get("tolerances") or []
    new, old = _comparable_leaves(published), _comparable_leaves(previous)

    def unchanged(path: str) -> bool:
        x, y = new.get(path), old.get(path)
        if path not in new or path not in old:
            return False
        if not (_is_number(x) and _is_number(y)):
            return x == y
        spec = None if same_family else _pending_tolerance(path, y, rows, moves)
        spec = spec or dict(rows).get(_first_pattern(path, rows))
        allowed = (spec["abs"] + spec["rel"] * abs(y) if spec and spec["kind"] == "band"
                   else float("inf") if spec and spec["kind"] == "ignored" else 0.0)
        return abs(x - y) <= allowed

    changed_records = {_record_of(path) for path in set(new) | set(old) if not unchanged(path)}
    kept = [path for path in [*moves.get("numbers", {}), *moves.get("same", [])]
            if unchanged(path) and _record_of(path) not in changed_records]
    return {"numbers": {path: moves["numbers"][path] for path in kept if path in moves.get("numbers", {})},
            "same": [path for path in kept if path in moves.get("same", [])],
            "differed": list(moves.get("differed", []))}


def uncompared(committed: dict, moves: dict) -> list[str]:
    """The published values and checks a pending family's guard does not compare (:func:`pending_view`)."""
    return sorted(path for path, value in _comparable_leaves(committed).items()
                  if path not in moves.get("numbers", {}) and path not in moves.get("same", []))


def write_pending(slug: str, family_name: str, published: dict, published_on: str, moves: dict,
                  measured: str | None, root: Path | None = None) -> Path:
    """Record that ``family_name`` (or one CPU model of a family, ``family@model``) waits for its
    own numbers of ``published``'s code."""
    name, _, model = family_name.partition("@")
    command = f"`replbook reference {slug[:2]}{' --cpu-model' if model else ''}`"
    machine = f"{name} machine with CPU model {model}" if model else f"{name} machine"
    payload = {"slug": slug, "family": family_name, "pending": True, "code_version": published.get("code_version"),
               "since": time.strftime("%Y-%m-%d"), "published_on": published_on,
               "why": f"{slug} was published on {published_on} under code this family has not run: until "
                      f"{command} runs on a {machine}, a rerun here is held to the "
                      f"published verdicts and to each number within its tolerance plus {PENDING_MARGIN:g} x the "
                      "cross-family move below; nbval runs the cells without comparing their outputs",
               "measured": measured, "moves": moves}
    path = reference_path(slug, family_name, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    return results.write_atomic(path, payload)


def model_spread(slug: str, family_name: str, variant: str, root: Path | None = None) -> dict | None:
    """How far the recorded runs of ``slug`` on CPU models of ``family_name`` lie apart, for a
    machine of a model (``variant``) none of them was made on: the moves of every two of the
    family's runs of the current code (its models' records and the family's own numbers,
    :func:`cross_family_moves`), each number's largest, the values alike in all of them, those
    that differed in any. None where the chapter has no record for a model of this family (its
    numbers were not seen to depend on the model), where ``variant`` made one of the runs, or
    where a record is pending or of other code (the guard reports those as they are).

    Such a machine can neither be held to a model's numbers (it is not that model) nor be
    sure of the family's (the models were seen to differ): it is held as a pending family is,
    to the verdicts exactly and to each number within its tolerance plus ``PENDING_MARGIN`` ×
    this spread, until ``replbook reference NN --cpu-model`` records its own."""
    root = root or repo_root()
    version = json.loads((root / "results" / f"{slug}.json").read_text()).get("code_version")
    models = sorted(reference_dir(root).glob(f"{family_name}@*/{slug}.json"))
    if not models:
        return None
    records = [json.loads(path.read_text()) for path in models]
    own = reference_path(slug, family_name, root)
    if own.exists():
        records.append(json.loads(own.read_text()))
    elif published_families(root).get(slug) == family_name:
        records.append({"results": json.loads((root / "results" / f"{slug}.json").read_text()),
                        "code_version": version})
    made_on = {path.parent.name.partition("@")[2] for path in models} | {recorded_variant(r) for r in records}
    if variant in made_on or any(r.get("pending") or r.get("code_version") != version for r in records):
        return None
    pairs = [cross_family_moves(a["results"], b["results"]) for i, a in enumerate(records) for b in records[i + 1:]]
    if not pairs:
        return None
    numbers: dict[str, float] = {}
    for moves in pairs:
        for path, move in moves["numbers"].items():
            numbers[path] = max(move, numbers.get(path, 0.0))
    common = set.intersection(*(set(moves["numbers"]) for moves in pairs))
    same = set.intersection(*(set(moves["same"]) for moves in pairs))
    return {"numbers": {path: numbers[path] for path in sorted(common)}, "same": sorted(same),
            "differed": sorted(set().union(*(moves["differed"] for moves in pairs))),
            "runs": [r.get("cpu", "the published run") for r in records]}


class Expected:
    """What a rerun of ``slug`` on a machine of ``family_name`` (and CPU model ``variant``:
    this machine's when None) must reproduce."""

    def __init__(self, slug: str, family_name: str | None = None, root: Path | None = None,
                 variant: str | None = None):
        root = root or repo_root()
        self.slug, self.family = slug, (family_name or family()).split("@")[0]
        self.variant = cpu_variant() if variant is None else variant
        # the record this machine is held to: its CPU model's, else its family's
        self.where = reference_name(slug, family_name or self.family, root, variant)
        self.committed = json.loads((root / "results" / f"{slug}.json").read_text())
        self.published_family = published_family(slug, root)
        self.dependent = slug in family_dependent(root)
        self.reference = self.pending = None
        path = reference_path(slug, self.where, root)
        # a CPU model's record applies on the published family too (the published run is another model's)
        if self.where != self.published_family and path.exists():
            record = json.loads(path.read_text())
            if record.get("code_version") != self.committed.get("code_version"):
                raise ValueError(
                    f"results/reference/{self.where}/{slug}.json was made with code {record.get('code_version')}, "
                    f"results/{slug}.json with {self.committed.get('code_version')}: rerun `replbook reference "
                    f"{slug[:2]}{self._model_flag}` on a {self._machine} machine (or delete it if the chapter no "
                    "longer differs there)")
            if record.get("pending"):
                self.pending = record
            else:
                self.reference = record
        # a CPU model none of the chapter's model records was made on: held within their spread
        self.spread = (model_spread(slug, self.family, self.variant, root)
                       if "@" not in self.where and self.variant and self.pending is None else None)

    @property
    def _model_flag(self) -> str:
        return " --cpu-model" if "@" in self.where else ""

    @property
    def _machine(self) -> str:
        name, _, variant = self.where.partition("@")
        return f"{name} ({variant})" if variant else name

    @property
    def results(self) -> dict:
        return self.reference["results"] if self.reference else self.committed

    @property
    def compares_outputs(self) -> bool:
        """Whether nbval compares the cells' outputs here (not on a pending family, nor on a CPU
        model whose numbers are not recorded where its family's models differ: its own are not known)."""
        return self.pending is None and self.spread is None

    @property
    def source(self) -> str:
        if self.pending:
            return (f"results/{self.slug}.json, made on {self.published_family}, with {self.where} pending since "
                    f"{self.pending.get('since')}: verdicts exactly, numbers within their tolerance plus "
                    f"{PENDING_MARGIN:g} x the measured cross-family move ("
                    f"{len(uncompared(self.committed, self.pending['moves']))} values and checks the families' last "
                    f"runs did not both compute are not compared), cell outputs not compared, until "
                    f"`replbook reference {self.slug[:2]}{self._model_flag}` runs on a {self._machine} machine")
        if self.spread:
            return (f"{self._family_source}, on a CPU model ({self.variant}) without its own numbers where the "
                    f"family's models differ ({len(self.spread['runs'])} recorded runs): verdicts exactly, numbers "
                    f"within their tolerance plus {PENDING_MARGIN:g} x the largest move between those runs, cell "
                    f"outputs not compared, until `replbook reference {self.slug[:2]} --cpu-model` runs here")
        return self._family_source

    @property
    def _family_source(self) -> str:
        if self.reference:
            return (f"results/reference/{self.where}/{self.slug}.json (this machine's "
                    f"{'CPU model' if '@' in self.where else 'family'}; "
                    f"results/{self.slug}.json was made on {self.published_family})")
        if self.family == self.published_family:
            return f"results/{self.slug}.json (made on this machine's family, {self.family})"
        if not self.dependent:
            return (f"results/{self.slug}.json, made on {self.published_family}: {self.slug} is not family-dependent "
                    f"(results/reference/family_dependent.json), so this machine ({self.family}) is held to its "
                    "published numbers")
        return (f"results/{self.slug}.json, made on {self.published_family}: this machine is {self.family}, for which "
                f"{self.slug} has no numbers: record them with `replbook reference {self.slug[:2]}` here")

    def cell_outputs(self, notebook) -> list[list[dict]] | None:
        """Per code cell of ``notebook`` (the committed one), the outputs nbval should expect on
        this family, or None to keep the notebook's own. Refuses a reference whose cells are
        not the notebook's."""
        if not self.reference:
            return None
        code = [c for c in notebook.cells if c.cell_type == "code"]
        cells = self.reference["cells"]
        if len(cells) != len(code) or any(source_digest(c.source) != r["source_sha"] for c, r in zip(code, cells)):
            raise ValueError(f"results/reference/{self.where}/{self.slug}.json was recorded from other cells than "
                             f"notebooks/{self.slug}.ipynb has: rerun `replbook reference {self.slug[:2]}"
                             f"{self._model_flag}`")
        return [r["outputs"] for r in cells]

    def compare(self, rerun: dict) -> list[str]:
        if self.pending:
            return results.compare(rerun, pending_view(self.committed, rerun, self.pending["moves"]))
        if self.spread:
            return results.compare(rerun, pending_view(self.results, rerun, self.spread))
        return results.compare(rerun, self.results)


def record_publication(slug: str, family_name: str, published: dict, previous: dict | None = None,
                       previous_notebook=None, root: Path | None = None, variant: str | None = None) -> list[Path]:
    """``published`` (results) just replaced ``previous`` (and its notebook): record which family
    made it, and drop that family's reference for the chapter (its published results are now the
    family's own). If the chapter is family-dependent, the previous results came from another
    family and the code is unchanged, they stay the guard for that family, as its reference (a
    family-independent chapter needs none: kept, it would only go stale with the next code
    change and be refused on that family). Under changed code, each other known family of a
    family-dependent chapter becomes pending (:func:`write_pending`), with the moves measured
    between the families' runs of the code just replaced (or carried from its earlier pending
    record). Returns the records written pending and any other family's record the new code
    made stale (each waits for ``replbook reference`` on such a machine).

    CPU models (``variant``: the publishing machine's, this one's when None): a chapter with a
    record for one model of a family treats each such record as a family of its own here.
    The publishing model's record is dropped (its numbers are now the published ones), and
    measured against as the publisher's old run; the publishing family's reference, made on
    another of its models, is filed under that model first, so that model keeps its numbers."""
    root = root or repo_root()
    variant = variant or cpu_variant()
    families = published_families(root)
    before = families.get(slug)
    dependent = slug in family_dependent(root)
    version = published.get("code_version")
    own, mine = reference_path(slug, family_name, root), reference_path(slug, variant_name(family_name, variant), root)
    if own.exists() and any(reference_dir(root).glob(f"{family_name}@*/{slug}.json")):
        record = json.loads(own.read_text())
        made_on = recorded_variant(record)
        moved_to = reference_path(slug, variant_name(family_name, made_on or "?"), root)
        if not record.get("pending") and made_on and made_on != variant and not moved_to.exists():
            moved_to.parent.mkdir(parents=True, exist_ok=True)
            results.write_atomic(moved_to, {**record, "family": moved_to.parent.name})
    # each family's run of the code being replaced: what the distance between families is measured on
    old_runs = {before: previous} if previous is not None and before else {}
    for path in sorted(reference_dir(root).glob(f"*/{slug}.json")):
        record = json.loads(path.read_text())
        if previous is not None and not record.get("pending") and record.get("code_version") == previous.get("code_version"):
            old_runs.setdefault(path.parent.name, record["results"])
    if mine.parent.name in old_runs:  # the publishing model's own run of the old code
        old_runs[family_name] = old_runs[mine.parent.name]
    if (previous is not None and previous_notebook is not None and before and before != family_name
            and previous.get("code_version") == version and dependent):
        write_reference(slug, before, previous, previous_notebook, root, cpu="the machine that published it before")
    families[slug] = family_name
    path = reference_dir(root) / "published.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    results.write_atomic(path, dict(sorted(families.items())))
    carried = None  # a pending record of the publishing family keeps the last measured distance
    if own.exists():
        record = json.loads(own.read_text())
        carried = record if record.get("pending") else None
        own.unlink()
    if mine.exists():
        mine.unlink()
    models = sorted({path.parent.name for path in reference_dir(root).glob(f"*@*/{slug}.json")})
    waiting = []
    for name in (*KNOWN_FAMILIES, *models) if dependent else ():
        path = reference_path(slug, name, root)
        record = json.loads(path.read_text()) if path.exists() else None
        if name == family_name or (record and record.get("code_version") == version):
            continue
        last_pending = record if record and record.get("pending") else carried  # the last measured distance
        if name in old_runs and family_name in old_runs:
            moves = cross_family_moves(old_runs[name], old_runs[family_name])
            measured = (f"code {previous.get('code_version')}: {name}'s run of {old_runs[name].get('date', '?')} vs "
                        f"{family_name}'s of {old_runs[family_name].get('date', '?')}")
        elif last_pending:
            moves, measured = last_pending["moves"], last_pending.get("measured")
        else:
            moves, measured = {"numbers": {}, "same": [], "differed": []}, None
        if family_name in old_runs:  # what this publication changed is no longer measured
            moves = still_measured(moves, published, old_runs[family_name], same_family=True)
        elif previous is not None:
            moves = still_measured(moves, published, previous, same_family=False)
        waiting.append(write_pending(slug, name, published, family_name, moves, measured, root))
    return waiting + [path for path in sorted(reference_dir(root).glob(f"*/{slug}.json"))
                      if path not in waiting and json.loads(path.read_text()).get("code_version") != version]
