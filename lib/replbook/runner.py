"""Running a chapter: papermill in a staging folder, publishing only a finished run, and
building the site. ``replbook run`` and ``replbook build`` (:mod:`replbook.cli`) and the
stability records (:mod:`replbook.stability`) all run chapters through :func:`run`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from . import config, numerics, results, scoreboard
from .config import PRESETS
from .paths import chapter_module, notebook_for, repo_root

VOLATILE_CELL_METADATA = ("execution", "papermill")
# the smoke and book presets run offline, the way a reader's laptop may be: the kernel
# inherits these, so no library looks up the hub (only the paper preset names hub models)
OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "HF_HUB_DISABLE_TELEMETRY": "1"}
# Float sums depend on the instruction set a library picks for the CPU it finds, and three
# libraries pick their own: torch's vectorised kernels (ATen), oneDNN (convolutions, some linear
# layers) and MKL (matrix products). On a Zen 4 machine (AVX-512) chapter 04's dense perplexity came
# out 47.4833 where the committed run gave 47.4829, and chapters 03, 05, 06 and 09 retrained their
# small models into other weights (a decisive check of 06 and 09 flipped). The committed results were
# made on an AVX2 machine (an AMD EPYC); with ATen and oneDNN asked for their AVX2 code, the Zen 4
# machine retrained chapter 09 into the committed numbers bit for bit (2026-12-01). MKL uses no
# AVX-512 on AMD CPUs (asking it for AVX2 there changes no bit); on an Intel CPU it would, hence its
# pin too. Not pinned: MKL's "conditional numerical reproducibility" mode (MKL_CBWR), which would
# tie Intel and AMD together but changes every committed number; and the thread count, which the
# chapters fix themselves (config.fix_threads). A reader may override any pin in the environment;
# the paper preset (a GPU node) pins none. The pins cannot tie an Intel CPU to an AMD one (MKL
# picks its code by vendor): numerics.py says how the guard holds a rerun to its own family's numbers.
CPU_PINS = numerics.PINS


def reproducible_cpu_environment() -> dict[str, str]:
    """The instruction-set pins a smoke or book run's kernel gets: the reader's own where set."""
    return {name: os.environ.get(name, value) for name, value in CPU_PINS.items()}


def check_parameters(notebook: Path, preset: str, parameters: dict) -> None:
    """The chapter's parameter rules, checked before a kernel starts (the notebook checks
    them again): raises :class:`config.ParameterError` in one line."""
    config.resolve(chapter_module(notebook).PRESETS, preset, **parameters)


def paper_models(slug: str, overrides: dict | None = None, root: Path | None = None) -> list[str]:
    """The hub models ``slug``'s paper preset names (registry names or hub ids), after
    ``overrides`` (a reader's ``-p`` values, or a dry run's :data:`dryrun.OVERRIDES`, may swap
    one for an offline model)."""
    import importlib

    from . import architectures, models

    module = chapter_module(notebook_for(slug[:2], root or repo_root()))
    module = importlib.import_module(f"replbook.{module}") if isinstance(module, str) else module
    named = []
    for value in {**module.PRESETS["paper"], **(overrides or {})}.values():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(item, str):
                continue
            spec = models.REGISTRY.get(item)
            hub = spec is not None and spec.source == "hub"
            if hub or item in architectures.ARCHITECTURES:
                named.append(item)
    return named


def hub_cache() -> Path:
    """The hub cache a kernel started now reads, by huggingface_hub's own order of variables
    (read here, not from ``huggingface_hub.constants``, which froze them at its import)."""
    home = Path.home() / ".cache"
    for name, under in (("HF_HUB_CACHE", None), ("HUGGINGFACE_HUB_CACHE", None), ("HF_HOME", "hub"),
                        ("XDG_CACHE_HOME", "huggingface/hub")):
        if os.environ.get(name):
            return Path(os.environ[name]).expanduser() / (under or "")
    return home / "huggingface" / "hub"


def hub_revisions(names: list[str], cache: Path | None = None) -> dict[str, str | None]:
    """The commit each of ``names`` (hub models, as :func:`paper_models` gives them) ran at.
    A pinned repository (``models.HUB_REVISIONS``) loads its pinned commit or fails, so that
    commit, where the hub cache holds its snapshot; an unpinned one its ``refs/main``, which
    names the snapshot ``from_pretrained`` resolved ``main`` to and loaded, and which moves.
    None where the cache holds neither. A paper run records what it got, so two runs whose
    numbers differ can be told apart by their weights."""
    from huggingface_hub.file_download import repo_folder_name

    from . import architectures, models

    cache = Path(cache or hub_cache())
    revisions = {}
    for name in names:
        hub_id = architectures.architecture(name).hub_id
        repository = cache / repo_folder_name(repo_id=models.hub_repository(hub_id), repo_type="model")
        pin, ref = models.hub_revision(hub_id), repository / "refs" / "main"
        if pin:
            revisions[hub_id] = pin if (repository / "snapshots" / pin).is_dir() else None
        else:
            revisions[hub_id] = ref.read_text().strip() if ref.is_file() else None
    return revisions


def notebook_parameters(path: Path) -> list[str]:
    import papermill

    return list(papermill.inspect_notebook(str(path)))


def clean_metadata(path: Path) -> None:
    """Drop per-cell timings papermill stores, so a rerun changes only what changed."""
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        for key in VOLATILE_CELL_METADATA:
            cell.get("metadata", {}).pop(key, None)
    pm = nb.get("metadata", {}).get("papermill", {})
    for key in ("start_time", "end_time", "duration", "input_path", "output_path"):
        pm.pop(key, None)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


class RunFailed(RuntimeError):
    """A chapter's run stopped in a cell; its partly executed notebook was kept."""

    def __init__(self, slug: str, cell_index: int, ename: str, evalue: str, kept: Path, traceback: str = ""):
        self.slug, self.cell_index, self.ename, self.evalue, self.kept = slug, cell_index, ename, evalue, kept
        self.traceback = traceback
        first = evalue.strip().splitlines()[0] if evalue.strip() else ""
        super().__init__(f"{slug} failed in cell {cell_index}: {ename}: {first} (partly executed notebook: {kept})")


def _remove_stale_staging(runs: Path, max_age_seconds: float = 24 * 3600) -> None:
    """Staging folders older than a day belong to runs that were killed (SIGKILL, power):
    a run removes its own on success, failure, Ctrl-C and SIGTERM."""
    import shutil
    import time

    for folder in runs.glob(".staging-*"):
        try:
            if time.time() - folder.stat().st_mtime > max_age_seconds:
                shutil.rmtree(folder)
        except OSError:  # another run removed it first
            pass


def _experiment_folder(root: Path, preset: str, parameters: dict) -> Path:
    return root / "runs" / (preset if not parameters else f"{preset}-with-overrides")


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine since boot (Linux); None elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_share(seconds: float = 1.0, times=_cpu_times) -> float:
    """The share of the machine's CPU time that processes used over the next ``seconds``
    (0 where it cannot be read)."""
    import time

    before = times()
    time.sleep(seconds)
    after = times()
    if before is None or after is None or after[1] <= before[1]:
        return 0.0
    return (after[0] - before[0]) / (after[1] - before[1])


# a published run records its wall-clock time as the chapter's runtime (the scoreboard's
# "min" column): a run started beside other work records the wait too (chapter 03 once
# recorded 758 s beside a test run, 131 s alone)
BUSY_WARNING = 0.5


def warn_if_busy(slug: str, share: float | None = None) -> bool:
    """Say on stderr, before a published run starts, that the machine is already busy."""
    share = busy_share() if share is None else share
    if share < BUSY_WARNING:
        return False
    print(f"replbook: the machine is {share:.0%} busy before {slug} starts: its published runtime will include "
          "the wait for the CPU (run chapters alone; `top` shows what else runs)", file=sys.stderr)
    return True


def run(chapter: str, preset: str = "book", parameters: dict | None = None, root: Path | None = None,
        publish: bool | None = None, out_dir: Path | None = None, progress: bool = True,
        prepare_first: bool = False) -> Path:
    """Execute one chapter with papermill; returns the executed notebook's path.

    Only a **finished** run at the ``book`` or ``paper`` preset **without overrides**
    is published: its notebook replaces ``notebooks/<slug>.ipynb`` and its results
    ``results/<slug>.json``. Smoke runs and runs with ``-p`` overrides (they change the
    experiment) write ``runs/<preset>[-with-overrides]/`` (or ``out_dir``) instead, unless
    ``publish=True``. Either way the run executes into a staging folder and its files are
    renamed into place only after every cell succeeded; a failed run keeps its partly
    executed notebook at ``runs/failed/<slug>.ipynb`` and raises :class:`RunFailed`.
    ``prepare_first`` (``replbook run`` sets it) builds what the chapter's preset reads once
    (``replbook prepare NN``: converted models, fetched or kept data) after the parameters
    passed their checks and before the notebook starts, so a first run on an empty cache
    needs no separate step; on a warm cache it only looks the entries up.
    """
    import shutil

    import papermill

    root = root or repo_root()
    source = notebook_for(chapter, root)
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not valid; choose one of: {', '.join(PRESETS)}")
    parameters = dict(parameters or {})
    known = notebook_parameters(source)
    unknown = sorted(set(parameters) - set(known))
    if unknown:
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for {source.name}; "
                         f"valid parameters: {', '.join(known)}")
    check_parameters(source, preset, parameters)
    if publish is None:
        publish = preset in ("book", "paper") and not parameters and out_dir is None
    if publish and preset == "smoke":
        raise ValueError("preset='smoke' runs are never published to results/; drop publish")
    slug = source.stem
    # the hub models this run loads, named before it starts (the run may replace the notebook they are read from)
    hub_models = paper_models(slug, parameters, root) if preset == "paper" else []
    if prepare_first:
        from . import prepare

        prepare.prepare([slug[:2]], preset, root, progress)
    if publish:
        final_notebook, final_results = source, root / "results" / f"{slug}.json"
    else:
        folder = Path(out_dir) if out_dir else _experiment_folder(root, preset, parameters)
        final_notebook, final_results = folder / source.name, folder / "results" / f"{slug}.json"
    (root / "runs").mkdir(exist_ok=True)
    _remove_stale_staging(root / "runs")
    stage = Path(tempfile.mkdtemp(prefix=f".staging-{slug}.", dir=root / "runs"))
    staged_notebook, staged_results = stage / source.name, stage / "results"
    if publish:
        warn_if_busy(slug)
    environment = {"REPLBOOK_RESULTS_DIR": str(staged_results),  # the kernel inherits these
                   **(OFFLINE_ENVIRONMENT | reproducible_cpu_environment() if preset != "paper" else {})}
    saved_environment = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    try:
        try:
            papermill.execute_notebook(
                str(source), str(staged_notebook), parameters={"preset": preset, **parameters},
                cwd=str(source.parent), kernel_name="python3", progress_bar=progress,
            )
        except papermill.PapermillExecutionError as err:
            kept = root / "runs" / "failed" / source.name
            kept.parent.mkdir(parents=True, exist_ok=True)
            if staged_notebook.exists():
                os.replace(staged_notebook, kept)
            raise RunFailed(slug, err.cell_index, err.ename, str(err.evalue), kept,
                            "\n".join(err.traceback or [])) from None
        result_file = staged_results / f"{slug}.json"
        if not result_file.exists():
            raise RuntimeError(f"{slug} ran to the end but saved no results (its run.save cell did not write "
                               f"{result_file.name})")
        if preset == "paper":  # which snapshot of each hub model ran (its pinned commit, or main's)
            saved = json.loads(result_file.read_text())
            saved["hub_revisions"] = hub_revisions(hub_models)
            results.write_atomic(result_file, saved)
            for hub_id, commit in saved["hub_revisions"].items():
                print(f"replbook: {slug} ran {hub_id} at " + (commit or "an unknown commit (not in the hub cache "
                      f"{hub_cache()})"), file=sys.stderr)
        clean_metadata(staged_notebook)
        final_notebook.parent.mkdir(parents=True, exist_ok=True)
        final_results.parent.mkdir(parents=True, exist_ok=True)
        previous = _published_run(final_notebook, final_results) if publish else None
        os.replace(staged_notebook, final_notebook)
        os.replace(result_file, final_results)
        if publish:  # which machines' sums these numbers are (numerics.py): the guard needs to know
            waiting = numerics.record_publication(slug, numerics.family(), json.loads(final_results.read_text()),
                                                  *(previous or (None, None)), root=root)
            for path in waiting:
                pending = json.loads(path.read_text()).get("pending")
                print(f"replbook: {path.relative_to(root)}: " + (
                    f"{path.parent.name} is pending for {slug} (the guard there holds verdicts and widened bands)"
                    if pending else "made with other code (make test fails until it is rerun)")
                    + f": on a {path.parent.name} machine, run `replbook reference {slug[:2]}`", file=sys.stderr)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return final_notebook


def record_reference(chapter: str, root: Path | None = None, progress: bool = True, cpu_model: bool = False) -> Path | None:
    """Rerun a chapter at the book preset here, on a machine of another numerics family than
    the one its published results come from, and record the rerun as this family's reference
    (:mod:`numerics`): the numbers the regression guard and nbval then expect on this family.
    Refused on the published family itself, and when the published results are not the
    chapter's current code (republish first: a reference is the same code on other sums).

    ``cpu_model``: record it for this machine's CPU model only (``family@f<family>m<model>``),
    for a chapter whose numbers differ between models of one family; allowed on the published
    family. Written only where the rerun differs from the numbers this model is otherwise held
    to (its family's), returning None when it does not."""
    root = root or repo_root()
    source = notebook_for(chapter, root)
    slug = source.stem
    here = numerics.family({**os.environ, **reproducible_cpu_environment()})  # what the kernel will have
    published = numerics.published_family(slug, root)
    if here == published and not cpu_model:
        raise ValueError(f"this machine is {here}, the family results/{slug}.json was made on: a rerun here is held to "
                         f"it directly; `replbook run {slug[:2]}` republishes (or, if this CPU model sums otherwise, "
                         f"`replbook reference {slug[:2]} --cpu-model`)")
    committed = json.loads((root / "results" / f"{slug}.json").read_text())
    version = results.code_version(slug, root)
    if committed.get("code_version") != version:
        raise ValueError(f"results/{slug}.json was made with code {committed.get('code_version')}, the chapter is now "
                         f"{version}: republish it (`replbook run {slug[:2]}`) before recording another family's numbers")
    name = numerics.variant_name(here, numerics.cpu_variant()) if cpu_model else here
    family_numbers = numerics.Expected(slug, here, root, variant="")  # what this model is held to without it
    (root / "runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".reference-{slug}.", dir=root / "runs") as folder:
        executed = run(chapter, "book", root=root, publish=False, out_dir=Path(folder), progress=progress)
        rerun = json.loads((Path(folder) / "results" / f"{slug}.json").read_text())
        if results.code_version(slug, root) != version:
            raise RuntimeError(f"{slug}'s code changed while it ran: nothing recorded")
        import nbformat

        differences = family_numbers.compare(rerun) if cpu_model else results.compare(rerun, committed)
        if cpu_model and not differences:
            print(f"{slug} on {here} ({numerics.cpu_model()}) gives the numbers of {family_numbers.source}: "
                  "no CPU-model reference needed, nothing recorded")
            return None
        path = numerics.write_reference(slug, name, rerun, nbformat.read(executed, as_version=4), root)
    if differences or results.compare(rerun, committed):
        numerics.mark_family_dependent(slug, root)
    print(f"{slug} on {name} ({numerics.cpu_model()}): {len(differences)} numbers beyond their tolerance of "
          + (family_numbers.source if cpu_model else f"results/{slug}.json (made on {published})")
          + "".join(f"\n  {d}" for d in differences[:12]))
    return path


def _published_run(notebook: Path, results_file: Path):
    """The published results and notebook a run is about to replace, or None."""
    if not (notebook.exists() and results_file.exists()):
        return None
    import nbformat

    return json.loads(results_file.read_text()), nbformat.read(notebook, as_version=4)


def needs_execution(notebook: Path, root: Path) -> bool:
    """A notebook with unexecuted code cells or no results file must be executed."""
    nb = json.loads(notebook.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    unexecuted = any(c.get("execution_count") is None for c in code)
    return unexecuted or not (root / "results" / f"{notebook.stem}.json").exists()


def write_scoreboard(root: Path) -> None:
    scoreboard.write_page(root / "book" / "_generated" / "scoreboard.md", root / "results")
    scoreboard.update_readme(root / "README.md", root / "results")


def build(root: Path | None = None, execute_missing: bool = True, out: Path | None = None) -> Path:
    root = root or repo_root()
    if execute_missing:
        for notebook in sorted((root / "notebooks").glob("[0-9][0-9]_*.ipynb")):
            if needs_execution(notebook, root):
                print(f"executing {notebook.name} at the book preset (it has no results yet)")
                run(notebook.name[:2], "book", root=root)
    write_scoreboard(root)
    out = out or root
    jb = Path(sys.executable).with_name("jupyter-book")
    built = subprocess.run([str(jb), "build", str(root), "--path-output", str(out), "-W", "-n", "--keep-going"])
    if built.returncode != 0:
        raise RuntimeError("the book build failed or warned (warnings are errors): see its output above")
    index = out / "_build" / "html" / "index.html"
    print(f"\nThe book is built: open file://{index}")
    return index
