"""How often a chapter's verdicts come out the same with another seed.

``replbook stability NN --seeds K`` reruns a chapter at the book preset K times,
each with every seed parameter it has moved together (``seed``, ``data_seed``, the
list ``seeds``: data draws, training and trained organisms such as chapter 05's
backbone and chapter 06's projector all follow them, and their caches key on
them), and writes ``results/stability/<slug>.json``: per claim, how many seeds
gave each verdict, and the spread of the numbers its decisive rule reads. Seed
indices 1 … K−1 run under ``runs/stability/``; index 0 is the committed seed, run
last and published like ``replbook run``, so the chapter's verdict section reads
the record (K book runs in all). The record carries the chapter's
:func:`results.code_version`; the tests fail when the chapter's rule or method
changed after the record was made.

``replbook stability NN --carry-forward`` is for a change that should not move the
chapter's numbers (code moved between modules, a renamed helper): it re-executes and
publishes the committed seed under the new code and keeps the record only if that run
passes the regression guard against the run the record was made with
(:func:`results.compare`). The record then says it was carried forward, not rerun.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Mapping

from . import numerics, results
from .paths import notebook_for, repo_root

SEED_PARAMETERS = ("seed", "data_seed", "seeds")
# what else a chapter needs when its seed moves: chapter 02's corpus is drawn from the seed,
# and a new corpus needs its own rationales (same writer and prompt; ~6 min each, written to
# the cache, never over the committed ones)
EXTRA_OVERRIDES = {"02_skill_slices": {"rationales": "regenerate"}}


def seed_overrides(config: Mapping[str, Any], index: int) -> dict[str, Any]:
    """The parameters that move a chapter to its ``index``-th stability seed (0: unchanged).

    ``seed`` and ``data_seed`` become ``committed + index``; a list ``seeds`` (chapters
    that already average over a few seeds) is shifted past itself, so the runs of two
    indices never share a seed: [0, 1, 2] -> [3, 4, 5] at index 1."""
    present = [p for p in SEED_PARAMETERS if p in config]
    if not present:
        raise ValueError(f"the chapter has none of the seed parameters {SEED_PARAMETERS}; cannot vary its seed")
    if index < 0:
        raise ValueError(f"index={index}: must be ≥ 0")
    out: dict[str, Any] = {}
    for name in present:
        value = config[name]
        if name == "seeds":
            seeds = list(value)
            out[name] = [s + index * (max(seeds) - min(seeds) + 1) for s in seeds]
        else:
            out[name] = int(value) + index
    return out if index else {}



def _entry(index: int, overrides: dict, saved: Mapping[str, Any], source: str) -> dict[str, Any]:
    return {"index": index, "overrides": overrides, "source": source,
            "runtime_seconds": saved.get("runtime_seconds"),
            "verdicts": {v["claim"]: v["verdict"] for v in saved["verdicts"]},
            "numbers": {v["claim"]: v.get("numbers", {}) for v in saved["verdicts"]}}


def run(chapter: str, seeds: int = 3, root: Path | None = None, progress: bool = True) -> Path:
    """Rerun ``chapter`` at the book preset with seed indices 1 … seeds−1 (under ``runs/``),
    write their record, then publish a fresh book run of the committed seed (index 0): its
    notebook reads the record, so its verdict section shows how many seeds agree, and the
    record is completed with it. Returns the record's path."""
    from tqdm.auto import tqdm

    from . import runner

    if seeds < 2:
        raise ValueError(f"seeds={seeds}: a stability record needs at least 2")
    root = root or repo_root()
    slug = notebook_for(chapter, root).stem
    committed_path = root / "results" / f"{slug}.json"
    if not committed_path.exists():
        raise ValueError(f"{slug} has no committed results: run `replbook run {slug[:2]}` first")
    committed = json.loads(committed_path.read_text())
    if committed["preset"] != "book":
        raise ValueError(f"results/{slug}.json is a {committed['preset']!r} run; stability is recorded at the book preset")
    version = results.code_version(slug, root)
    others = []
    for index in tqdm(range(1, seeds), desc=f"{slug}: other seeds", disable=not progress):
        overrides = {**seed_overrides(committed["config"], index), **EXTRA_OVERRIDES.get(slug, {})}
        folder = root / "runs" / "stability" / slug / f"seed-{index}"
        runner.run(chapter, "book", overrides, root=root, publish=False, out_dir=folder, progress=False)
        saved = json.loads((folder / "results" / f"{slug}.json").read_text())
        others.append(_entry(index, overrides, saved, f"runs/stability/{slug}/seed-{index}"))
    path = root / "results" / "stability" / f"{slug}.json"

    def write(runs):
        if results.code_version(slug, root) != version:
            raise RuntimeError(f"{slug}'s code changed while its stability runs ran; start again")
        return results.write_atomic(path, {
            "slug": slug, "title": committed["title"], "preset": "book", "code_version": version,
            "seeds": [r["index"] for r in runs], "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "runs": runs, "claims": results.stability_claims(runs)})

    write(others)  # the committed seed's run below reads these
    print(f"{slug}: publishing the committed seed's run, which shows the record")
    runner.run(chapter, "book", root=root, progress=progress)
    published = json.loads(committed_path.read_text())
    return write([_entry(0, {}, published, f"results/{slug}.json"), *others])


class CarryForwardRefused(RuntimeError):
    """The committed seed's rerun under the new code differs from the run the stability
    record was made with: the record stays stale and must be rerun over seeds."""

    def __init__(self, slug: str, differences: list[str]):
        self.slug, self.differences = slug, differences
        listed = "\n  ".join(differences[:20])
        super().__init__(f"{slug}: the rerun differs from the run its stability record was made with, so the "
                         f"record stays stale; rerun `replbook stability {slug[:2]} --seeds 3`. Differences:\n  {listed}")


def _restore(files: dict[Path, bytes], slug: str, root: Path) -> None:
    """Put back files a refused or stopped carry-forward replaced (each through a rename), and
    remove the numerics records of ``slug`` its publication wrote where there were none."""
    for path in numerics.reference_dir(root).glob(f"*/{slug}.json"):
        if path not in files:
            path.unlink()
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.restoring")
        temporary.write_bytes(content)
        os.replace(temporary, path)


def carry_forward(chapter: str, root: Path | None = None, progress: bool = True) -> Path:
    """Keep a stability record across a code change that moves no number.

    Re-executes and publishes the committed seed at the book preset under the current
    code, then compares it with the results the record was made with
    (:func:`results.compare`: config, every verdict and decisive check exactly, every
    number within the chapter's own tolerances; a parameter the new code adds may be new
    to the config, and the record lists it). Equal: the record takes the new code
    version, the new run as its index 0 and a ``carried_forward`` entry saying so (the
    other seeds are not rerun: a pure refactor cannot move them either, and the entry says
    that this is assumed). Different: the record keeps its old code version, so the tests
    fail until the seeds are rerun, and :class:`CarryForwardRefused` lists the differences.
    The record is marked current while the chapter runs, so the published verdict section
    shows the seeds' agreement; it is restored if the run fails or differs, and so are the
    published results and notebook the run replaced. Refused on a machine of another numerics
    family than the published run's where the chapter's numbers depend on it (:mod:`numerics`)."""
    from . import runner

    root = root or repo_root()
    slug = notebook_for(chapter, root).stem
    path = root / "results" / "stability" / f"{slug}.json"
    record = results.load_stability(slug, root)
    if record is None:
        raise ValueError(f"{slug} has no stability record to carry forward: run `replbook stability {slug[:2]} --seeds 3`")
    committed_path = root / "results" / f"{slug}.json"
    committed = json.loads(committed_path.read_text())
    if committed.get("code_version") != record["code_version"]:
        raise ValueError(f"results/{slug}.json (code {committed.get('code_version')}) is not the run the stability record "
                         f"was made with (code {record['code_version']}): a carry-forward compares against that run; "
                         f"rerun `replbook stability {slug[:2]} --seeds 3`")
    version = results.code_version(slug, root)
    if version == record["code_version"]:
        print(f"{slug}: the stability record is current; nothing to carry forward "
              f"(`replbook run {slug[:2]}` republishes the committed seed under this code)")
        return path
    here = numerics.family({**os.environ, **runner.reproducible_cpu_environment()})
    made_on = numerics.published_families(root).get(slug)
    where = numerics.reference_name(slug, here, root)  # this CPU model's own record, else its family's
    if made_on and where != made_on and numerics.reference_path(slug, where, root).exists():
        # the rerun would replace numbers of one family (or CPU model) by another's, and under new
        # code the old ones could not stay as its reference: its machines would lose their guard
        raise ValueError(f"{slug}'s numbers depend on the CPU (results/reference/{where}/ holds this "
                         f"machine's) and results/{slug}.json was made on another: carry it forward on a "
                         f"{made_on} machine whose numbers are the published ones, then `replbook reference "
                         f"{slug[:2]}{' --cpu-model' if '@' in where else ''}` on this one")
    # what a refused or stopped run must leave as it was: the published run, its family and the
    # other families' records (publishing under new code turns them pending)
    notebook = notebook_for(chapter, root)
    records = sorted(numerics.reference_dir(root).glob(f"*/{slug}.json"))
    kept = {f: f.read_bytes() for f in (committed_path, notebook, numerics.reference_dir(root) / "published.json",
                                        *records) if f.exists()}
    results.write_atomic(path, {**record, "code_version": version})
    try:
        runner.run(chapter, "book", root=root, progress=progress)
        published = json.loads(committed_path.read_text())
        # a parameter the new code adds (with the value that keeps the old behaviour) is no
        # difference by itself: the run must still match every verdict and number
        added = {k: v for k, v in published.get("config", {}).items() if k not in committed.get("config", {})}
        differences = results.compare(published, {**committed, "config": {**committed.get("config", {}), **added}})
        if results.code_version(slug, root) != version:
            differences.append(f"{slug}'s code changed while it ran")
    except BaseException:
        results.write_atomic(path, record)
        _restore(kept, slug, root)
        raise
    if differences:
        results.write_atomic(path, record)
        _restore(kept, slug, root)
        raise CarryForwardRefused(slug, differences)
    runs = [_entry(0, {}, published, f"results/{slug}.json"), *(r for r in record["runs"] if r["index"] != 0)]
    history = [*record.get("carried_forward", []),
               {"from": record["code_version"], "to": version, "date": time.strftime("%Y-%m-%d"),
                "check": "the committed seed, re-executed under the new code, passes the regression guard against "
                         "the run the record was made with; the other seeds were not rerun",
                **({"parameters_added": added} if added else {})}]
    return results.write_atomic(path, {**record, "code_version": version, "runs": runs,
                                       "claims": results.stability_claims(runs), "carried_forward": history})
