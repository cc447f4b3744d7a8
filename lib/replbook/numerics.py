"""Which machines sum floats alike, and which committed numbers a rerun on this one must give.

A rerun gives the committed numbers bit for bit only where torch, oneDNN and MKL add floats
in the same order as on the machine that made them. The CPU pins (``runner.CPU_PINS``) tie
CPUs of one vendor together (a Zen 4 retrained chapter 09 into the numbers a Zen 2 machine
committed). They cannot tie Intel to AMD: MKL picks its matrix-product code by vendor, and
its one mode that gives the same sums on both (``MKL_CBWR=COMPATIBLE``) is SSE2 code that
would slow every chapter and change every committed number. Small models trained on the CPU
then carry a last-bit difference into other weights: on an Intel Xeon (2026-12) chapters 03,
04, 05, 06, 08 and 09 came out beyond their tolerances (05's FID-style distances by 5–10 %),
while 00, 01, 02, 07 and 10 gave the committed numbers.

So the book records which **numerics family** each chapter's published results come from
(``results/reference/published.json``: CPU architecture, vendor and whether the pins were in
force), and for a chapter whose numbers differ on another family, that family's own rerun of
the same code under ``results/reference/<family>/<slug>.json``: its results and the text
outputs nbval compares. ``replbook reference NN``, run on a machine of that family, makes
one. The regression guard and nbval then hold a rerun to the numbers of its own family —
exactly as tightly as on the published one; a chapter with no reference for this family is
held to the published numbers (right for the chapters whose numbers do not depend on it).
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
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


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name and family/model numbers, for the record (not part of the family)."""
    try:
        cpuinfo = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    fields = {}
    for line in cpuinfo.splitlines():
        if ":" in line:
            key, value = (part.strip() for part in line.split(":", 1))
            fields.setdefault(key, value)
    return f"{fields.get('model name', 'unknown')} (family {fields.get('cpu family', '?')}, model {fields.get('model', '?')})"


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
            covered.add(name)
    return [name for name in KNOWN_FAMILIES if name not in covered]


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


class Expected:
    """What a rerun of ``slug`` on a machine of ``family_name`` must reproduce."""

    def __init__(self, slug: str, family_name: str | None = None, root: Path | None = None):
        root = root or repo_root()
        self.slug, self.family = slug, family_name or family()
        self.committed = json.loads((root / "results" / f"{slug}.json").read_text())
        self.published_family = published_family(slug, root)
        self.reference = None
        path = reference_path(slug, self.family, root)
        if self.family != self.published_family and path.exists():
            self.reference = json.loads(path.read_text())
            if self.reference.get("code_version") != self.committed.get("code_version"):
                raise ValueError(
                    f"results/reference/{self.family}/{slug}.json was made with code {self.reference.get('code_version')}, "
                    f"results/{slug}.json with {self.committed.get('code_version')}: rerun `replbook reference "
                    f"{slug[:2]}` on a {self.family} machine (or delete it if the chapter no longer differs there)")

    @property
    def results(self) -> dict:
        return self.reference["results"] if self.reference else self.committed

    @property
    def source(self) -> str:
        if self.reference:
            return (f"results/reference/{self.family}/{self.slug}.json (this machine's family; "
                    f"results/{self.slug}.json was made on {self.published_family})")
        if self.family == self.published_family:
            return f"results/{self.slug}.json (made on this machine's family, {self.family})"
        return (f"results/{self.slug}.json, made on {self.published_family}: this machine is {self.family}, for which "
                f"{self.slug} has no reference. If the numbers differ only because the family does, record one with "
                f"`replbook reference {self.slug[:2]}` here")

    def cell_outputs(self, notebook) -> list[list[dict]] | None:
        """Per code cell of ``notebook`` (the committed one), the outputs nbval should expect on
        this family, or None to keep the notebook's own. Refuses a reference whose cells are
        not the notebook's."""
        if not self.reference:
            return None
        code = [c for c in notebook.cells if c.cell_type == "code"]
        cells = self.reference["cells"]
        if len(cells) != len(code) or any(source_digest(c.source) != r["source_sha"] for c, r in zip(code, cells)):
            raise ValueError(f"results/reference/{self.family}/{self.slug}.json was recorded from other cells than "
                             f"notebooks/{self.slug}.ipynb has: rerun `replbook reference {self.slug[:2]}`")
        return [r["outputs"] for r in cells]

    def compare(self, rerun: dict) -> list[str]:
        return results.compare(rerun, self.results)


def record_publication(slug: str, family_name: str, published: dict, previous: dict | None = None,
                       previous_notebook=None, root: Path | None = None) -> list[Path]:
    """``published`` (results) just replaced ``previous`` (and its notebook): record which family
    made it, and drop that family's reference for the chapter (its published results are now the
    family's own). If the chapter is family-dependent, the previous results came from another
    family and the code is unchanged, they stay the guard for that family, as its reference (a
    family-independent chapter needs none: kept, it would only go stale with the next code
    change and be refused on that family). Returns the other families' references the new code
    made stale (each needs ``replbook reference`` on such a machine)."""
    root = root or repo_root()
    families = published_families(root)
    before = families.get(slug)
    if (previous is not None and previous_notebook is not None and before and before != family_name
            and previous.get("code_version") == published.get("code_version")
            and slug in family_dependent(root)):
        write_reference(slug, before, previous, previous_notebook, root, cpu="the machine that published it before")
    families[slug] = family_name
    path = reference_dir(root) / "published.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    results.write_atomic(path, dict(sorted(families.items())))
    own = reference_path(slug, family_name, root)
    if own.exists():
        own.unlink()
    return [path for path in sorted(reference_dir(root).glob(f"*/{slug}.json"))
            if json.loads(path.read_text()).get("code_version") != published.get("code_version")]
