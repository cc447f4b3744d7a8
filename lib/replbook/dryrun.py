"""``replbook dryrun NN``: a chapter's ``paper`` preset run on its paper models built from
their public configurations (:mod:`replbook.architectures`) — random weights, full width,
``layers`` transformer layers deep — served from a local hub cache, so the chapter's own
``from_pretrained("meta-llama/Llama-2-7b-hf")`` finds them offline (issue #29).

What it proves: the paper preset's code path (hub ids as shipped, the model classes they
resolve to, full-width shapes such as Llama-2-70B's grouped-query attention, the dtypes and
``device_map`` the chapter asks for) runs end to end; what it records: seconds and peak
memory. What it does not: any number about the paper — the weights are random. Its
notebooks and results go to ``runs/dryrun/<layers>/``, never to ``results/``, and the run
says "dry run" wherever it writes.

The hub cache is built once per (model, depth) under ``cache_dir("dryrun-hub")`` in the
hub's layout (``models--org--name/snapshots/<revision>/`` and ``refs/main``; the revision hashes
what the snapshot is built from, see :func:`revision`; the commit the registry pins,
``models.HUB_REVISIONS``, names the same snapshot, which is what the chapter loads), with the
book's byte-level tokenizer (256 byte tokens + end-of-text: ids fit every vocabulary).
Hub *datasets* are not faked: :data:`OVERRIDES` swaps a chapter's hub texts for offline
ones and shrinks its workload to a step or two. A local dataset folder a reader would
supply (chapter 10's COCO) is written in its layout from the book's own data
(:func:`fake_coco`). open_clip models are served where open_clip looks for them, at full
depth (:func:`served_depth`); a Stable Diffusion repository part by part, one resnet layer
per UNet/VAE block at ``layers`` = 1.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from . import architectures, models
from .paths import cache_dir, repo_root
from .runner import paper_models  # the hub models a paper preset names: what to serve

FAKE_COCO = "fake COCO folder"  # an OVERRIDES value of ``data``: the folder :func:`fake_coco` writes

# per chapter: the smallest paper-preset workload that still walks its code path, and
# offline texts for the hub datasets (wikitext-2) it would read
OVERRIDES: dict[str, dict[str, Any]] = {
    "00_model_zoo": {},
    # random weights know no fact, so every fact counts; one relation, a few facts, two k (the
    # claims compare them), one step of corruption and of each of the paper's eight methods at
    # one learning rate; the one layer built is the band that learns
    "01_restor": {"known_only": False, "countries": 12, "relations": ["capital"], "corrupted_per_relation": 3,
                  "tuning_per_relation": 2, "untouched_per_relation": 3, "mix_k": [0, 1], "corruption_steps": 1,
                  "unlearning_steps": 1, "learning_rates": [1e-5], "batch_size": 2, "trainable_layers": [0, 1],
                  "evaluation_text": "synthetic", "retain_text": "synthetic", "retain_documents": 4},
    "02_skill_slices": {"tasks": ["addition", "capitals", "syllogisms"], "min_tasks": 2, "per_task": 4,
                        "rationale_tokens": 8, "min_slice": 1, "route_min_cluster": 2},
    # OpenAI's CLIP ViT-B/16 through open_clip, served at full size (see served_depth)
    "03_intcoop": {"pool_size": 40, "n_test": 40, "shots": 2, "steps": 2, "seeds": [1]},
    # Endor on the CPU (the paper preset's device is a GPU's), one short window of offline text
    "04_endor": {"device": "cpu", "calibration_text": "synthetic", "evaluation_text": "synthetic", "window": 32,
                 "calibration_windows": 1, "evaluation_windows": 1, "sparsities": [0.5], "new_tokens": 2},
    # Stable Diffusion 1.4 at full width, one resnet layer per UNet/VAE block and one text
    # layer, at 256 px (SD_SHRINK); three test prompts (the FID-style PCA needs them), one
    # sample, a couple of steps
    "05_t2i_composition": {"held_out": 3, "samples_per_prompt": 1, "sampling_steps": 2, "sample_batch": 2,
                           "untrained_towers": 1, "optimize_steps": 1, "optimize_views": 1, "projection_steps": 1,
                           "projection_batch": 2, "switch_at": 1},
    # the fake hub's byte-level tokenizer makes no country name one token; one prompt per
    # forward pass walks the row-block path the paper preset's 7B model takes
    "06_mllm_tracing": {"forward_batch": 1, "n_countries": 6, "require_known": False, "single_token_names": False, "train_views": 1,
                        "test_views": 1, "n_trace": 2, "n_names": 2, "noise_draws": 2, "attention_layers": 1, "ablate_k": [1, 2],
                        "ablation_draws": 1, "n_edits": 2, "edit_layers": [0], "edit_views": 1, "value_steps": 1,
                        "finetune_steps": 1, "specificity_flags": 2, "covariance_text": "synthetic",
                        "covariance_tokens": 256, "bootstrap": 10},
    # TrustMark fetches its own weights on first use (no hub, no network here): the dry run
    # proves the paper's two hub embedders at the paper's image size with the book's
    # 32-bit watermark, whose payload fits a length-31 code (the paper's is 63 bits long)
    "07_drew": {"watermarks": ["rivagan"], "ecc": "bch-31-6", "n_reference": 128, "n_queries": 8,
                "bootstrap_samples": 100},
    "08_loki": {"calibration_text": "synthetic", "evaluation_text": "synthetic", "window": 64,
                "calibration_windows": 1, "evaluation_windows": 1, "contexts": [256], "timing_repeats": 1},
    # its three hub ViTs one layer deep, and OpenAI's CLIP ViT-B/16 at full size (open_clip)
    "09_vit_decompose": {"n_train": 64, "n_test": 32, "probe_steps": 2, "n_align": 64,
                         "align_steps": 2, "random_sets": 2},
    # COCO is a local folder, not a hub dataset: the dry run writes one in COCO's layout
    # (fake_coco); Mask R-CNN's COCO weights are a torchvision download, so its untrained
    # network walks the segmenter's code path; the encoders are trained here, so one layer
    # of the paper's ViT-B width stands for the dry run's depth
    "10_semantic_tokens": {"data": FAKE_COCO, "n_train": 32, "n_val": 8, "n_test": 8, "depth": 1,
                           "segmenter": "maskrcnn-untrained", "max_epochs": 1, "patience": 1, "batch": 16,
                           "seeds": [0]},
}


def depth_label(layers: int | None) -> str:
    """How folders and records name a dry run's depth: ``layers-2``, or ``full`` (``layers``
    None: every model at its own depth, the whole model; on a GPU that fits it)."""
    if layers is None:
        return "full"
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ValueError(f"layers={layers!r}: a whole number of layers, at least 1, or None (full depth)")
    return f"layers-{layers}"


def revision(name: str, layers: int | None) -> str:
    """The fake commit ``name``'s dry-run snapshot at ``layers`` deep is filed under: a hash
    of what the snapshot is built from (its public config and dtype, the depth, and the
    code that writes it), so a corrected config is built afresh instead of the cache
    serving the old one (a wrong CLIP ViT-L/14 tower projection once outlived its fix)."""
    import hashlib
    import inspect

    arch = architectures.architecture(name)
    built_from = {"hub_id": arch.hub_id, "family": arch.family, "config": arch.config, "dtype": arch.dtype,
                  "layers": layers, "code": [inspect.getsource(f) for f in (_save, _save_tokenizer, served_depth)],
                  "processor": arch.processor,
                  "schedule": SD_SCHEDULES.get(arch.hub_id), "sd_shrink": SD_SHRINK if arch.parts else None,
                  "parts": {p: architectures.architecture(p).config for p in arch.parts or ()}}
    return hashlib.sha1(json.dumps(built_from, sort_keys=True, default=str).encode()).hexdigest()


def fake_coco(n_train: int, n_val: int, root: Path | None = None) -> Path:
    """A folder in COCO 2017's caption layout (``annotations/captions_train2017.json`` and
    ``captions_val2017.json``, JPEGs in ``train2017/`` and ``val2017/``) holding the book's
    generated scenes and their captions: chapter 10's COCO reader walks its code path on
    it offline. It is not COCO: nothing measured on it says anything about COCO."""
    from . import semtokens
    from .paths import cached_dir

    root = root or cache_dir("dryrun-coco", f"train-{n_train}-val-{n_val}")

    def build(tmp: Path) -> dict:
        from PIL import Image

        (tmp / "annotations").mkdir()
        for split, n, seed in (("train2017", n_train, 1), ("val2017", n_val, 2)):
            scenes = semtokens.scene_split(n, False, seed)
            (tmp / split).mkdir()
            images, captions = [], []
            for i, (pixels, caption) in enumerate(zip(scenes.images, scenes.captions), start=1):
                name = f"{i:012d}.jpg"  # COCO's file naming
                Image.fromarray(pixels).save(tmp / split / name, quality=95)
                images.append({"id": i, "file_name": name, "height": pixels.shape[0], "width": pixels.shape[1]})
                captions.append({"id": i, "image_id": i, "caption": caption})
            (tmp / "annotations" / f"captions_{split}.json").write_text(
                json.dumps({"images": images, "annotations": captions}))
        return {"layout": "COCO 2017 captions", "images": "the book's generated scenes (not COCO)",
                "train": n_train, "val": n_val}

    cached_dir(root, build)
    return root


def snapshot(root: Path, name: str, layers: int | None) -> Path:
    """Where the hub cache keeps ``name``'s files at ``layers`` deep (the layout
    huggingface_hub reads offline: ``models--org--name/snapshots/<revision>/``)."""
    repo = root / f"models--{architectures.architecture(name).hub_id.replace('/', '--')}"
    return repo / "snapshots" / revision(name, layers)


def _save_tokenizer(folder: Path, max_length: int | None = None) -> None:
    from . import models

    tokenizer = models._byte_tokenizer()  # the registry's tiny-model tokenizer: 257 ids
    if max_length:
        tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(folder)


SERVED = ("llama", "opt", "gemma3", "llava", "clip", "dinov2", "vit", "bert", "pipeline")

# a Stable Diffusion repository's noise schedule (scheduler/scheduler_config.json: the
# numbers DDPM-type schedulers read); the other parts come from replbook.architectures
SD_SCHEDULES = {
    "CompVis/stable-diffusion-v1-4": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                      "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
                                      "clip_sample": False, "steps_offset": 1},
    "stabilityai/stable-diffusion-2-1": {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                         "beta_schedule": "scaled_linear", "prediction_type": "v_prediction",
                                         "clip_sample": False, "steps_offset": 1},
}
# A Stable Diffusion UNet's config states the latent size its pipeline draws at (SD 1.4:
# 64, so 512 px); the chapter draws at that size. A dry run serves the UNet at 1/SD_SHRINK of
# it: no weight depends on the resolution, only the run's cost (at 512 px on 2 cores chapter
# 05's dry run needs about 90 minutes, its first draw 27 of them), so the code path is walked
# at 256 px, as it is at one layer deep
SD_SHRINK = 2
# files a loader asks for that the repository does not have (AutoTokenizer reads a
# config.json beside a pipeline's tokenizer): marked as huggingface_hub marks a file it
# found missing online (``.no_exist/<revision>/<path>``), so an offline load knows it is
# absent instead of failing to reach the hub
ABSENT = {"pipeline": ("tokenizer/config.json",)}
# where a pipeline part lives in its repository, by the part's family
SD_SUBFOLDERS = {"sd-unet": "unet", "sd-vae": "vae", "clip-text": "text_encoder"}


def open_clip_architecture(name: str) -> str | None:
    """open_clip's own name for ``name`` when the book loads it through open_clip (by
    architecture and pretrained tag, the weights from its hub repository), else None."""
    from . import models

    hub_id = architectures.architecture(name).hub_id
    return next((arch for registry_name, (arch, _) in models.OPEN_CLIP_NAMES.items()
                 if models.REGISTRY[registry_name].hub_id == hub_id), None)


def served_depth(name: str, layers: int | None) -> int | None:
    """How deep the dry run serves ``name``: ``layers``, or None (full depth) for an open_clip
    model, which open_clip builds from its own named configuration before loading the hub's
    weights into it (a shallower checkpoint would not load)."""
    return None if open_clip_architecture(name) else layers


def sd_pixels(name: str, served: bool = False) -> int:
    """The pixels Stable Diffusion pipeline ``name`` draws at: its UNet's sample size times
    the VAE's downsampling; ``served``: as a dry run serves it, the sample size cut by SD_SHRINK."""
    arch = architectures.architecture(name)
    parts = {architectures.architecture(p).family: architectures.architecture(p).config for p in arch.parts}
    unet, vae = parts["sd-unet"], parts["sd-vae"]
    sample = unet["sample_size"] // SD_SHRINK if served else unet["sample_size"]
    return sample * 2 ** (len(vae["block_out_channels"]) - 1)


def served_image_size(name: str) -> str:
    """The pixels a served Stable Diffusion draws at, beside its own (see SD_SHRINK)."""
    return f"{sd_pixels(name, served=True)} px (its own: {sd_pixels(name)} px)"


def _save(name: str, folder: Path, layers: int | None) -> None:
    """``name`` at ``layers`` deep, random weights in the paper's dtype, saved as on the hub."""
    import transformers

    arch = architectures.architecture(name)
    open_clip_name = open_clip_architecture(name)
    if open_clip_name:  # the file open_clip's hub download looks for first, at full depth
        import open_clip
        from safetensors.torch import save_file

        model = open_clip.create_model(open_clip_name, pretrained=None)  # random weights, open_clip's config
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
        return
    if arch.family not in SERVED:
        raise ValueError(f"{name!r}: a dry run cannot serve family {arch.family!r} yet; it serves "
                         f"{', '.join(sorted(SERVED))}")
    if arch.family == "pipeline":  # Stable Diffusion: one subfolder per part, as on the hub
        from diffusers import DDPMScheduler

        for part in arch.parts:
            family = architectures.architecture(part).family
            # float32: what the repositories' main revision holds (float16 is a variant)
            model = architectures.build(part, layers, device="cpu", dtype="float32")
            if family == "sd-unet":
                model.register_to_config(sample_size=model.config.sample_size // SD_SHRINK)
            model.save_pretrained(folder / SD_SUBFOLDERS[family])
        _save_tokenizer(folder / "tokenizer", 77)
        DDPMScheduler(**SD_SCHEDULES[arch.hub_id]).save_pretrained(folder / "scheduler")
        return
    model = architectures.build(name, layers=layers, device="cpu", dtype=arch.dtype)
    if arch.family in ("llama", "opt", "gemma3"):
        model.save_pretrained(folder)
        _save_tokenizer(folder)
    elif arch.family == "llava":
        model.save_pretrained(folder)
        _save_tokenizer(folder)
        size = arch.config["vision_config"]["image_size"]
        transformers.CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}
                                        ).save_pretrained(folder)
    elif arch.family in ("clip", "dinov2", "vit"):
        model.save_pretrained(folder)
        size = arch.config.get("vision_config", arch.config)["image_size"]
        resize, crop = arch.processor or (size, size)  # the repository's processor (Architecture.processor)
        processor = transformers.CLIPImageProcessor if arch.family == "clip" else transformers.BitImageProcessor
        processor(size={"shortest_edge": resize}, crop_size={"height": crop, "width": crop}).save_pretrained(folder)
        if arch.family == "clip":
            _save_tokenizer(folder, 77)
    elif arch.family == "bert":  # a sentence-transformers repository: the encoder + mean pooling
        import shutil

        from sentence_transformers import SentenceTransformer
        from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

        raw = folder / "encoder"
        model.save_pretrained(raw)
        _save_tokenizer(raw, arch.config["max_position_embeddings"])
        word = Transformer(str(raw))
        SentenceTransformer(modules=[word, Pooling(word.get_embedding_dimension(), pooling_mode="mean")],
                            device="cpu").save(str(folder))
        shutil.rmtree(raw)
    else:
        raise ValueError(f"{name!r}: a dry run cannot serve family {arch.family!r} yet")


def fake_hub(names: list[str], layers: int | None = 1, root: Path | None = None) -> Path:
    """The hub cache serving each of ``names`` (registry names or hub ids) at ``layers`` deep;
    built once per model and depth, under a lock, and reused."""
    from .paths import cached_dir

    root = root or cache_dir("dryrun-hub", depth_label(layers))
    for name in names:
        hub_id = architectures.architecture(name).hub_id
        folder = snapshot(root, name, layers)

        def build(tmp: Path, name=name, hub_id=hub_id) -> dict:
            _save(name, tmp, layers)
            return {"hub_id": hub_id, "layers": served_depth(name, layers) or "all",
                    "weights": "random, from the public config"}

        cached_dir(folder, build)  # verified on load: a damaged snapshot is built again
        refs = folder.parent.parent / "refs"
        refs.mkdir(exist_ok=True)
        (refs / "main").write_text(folder.name)
        served_as = [folder.name]  # the snapshot's names: its content hash, and the pinned commit
        pin = models.hub_revision(hub_id)
        if pin:  # the chapter asks for the pinned commit: the same snapshot, by that name too
            _point(folder.parent / pin, folder.name)
            served_as.append(pin)
        for path in ABSENT.get(architectures.architecture(name).family, ()):
            for revision_name in served_as:
                marker = folder.parent.parent / ".no_exist" / revision_name / path
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.touch()
    return root


def _point(link: Path, target: str) -> None:
    """``link`` made a symbolic link to the sibling folder ``target``, replaced in one step
    (a process loading through the old link meanwhile reads a whole snapshot, old or new)."""
    if link.is_symlink() and os.readlink(link) == target:
        return
    temporary = link.with_name(f"{link.name}.tmp-{os.getpid()}-{time.monotonic_ns()}")
    os.symlink(target, temporary)
    os.replace(temporary, link)


def high_water_bytes(pid: int) -> int | None:
    """The peak resident memory of process ``pid`` so far (Linux: ``VmHWM`` of
    ``/proc/<pid>/status``), or None once it is gone. Not ``getrusage``'s ``ru_maxrss``: a
    child's ``ru_maxrss`` keeps the resident memory of the parent it was forked from (kept
    across ``exec``), so a kernel launched by a process holding 10 GB reported 10 GB."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (Linux: the parent ids in ``/proc/<pid>/stat``)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class GpuMemory:
    """The memory in use on every NVIDIA GPU NVML sees (``nvidia-ml-py``), summed: what a
    dry run on a GPU reads its peak from. Device-wide, not per process: NVML names processes
    by the host's process ids, which a container's are not, so a dry run counts what rose
    above the memory in use when it began (a lent GPU runs nothing else). It counts what the
    CUDA context and torch's caching allocator hold, which is what must fit."""

    def __init__(self, nvml):
        self._nvml = nvml
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        name = nvml.nvmlDeviceGetName(self._handles[0])
        self.name = name.decode() if isinstance(name, bytes) else name
        if len(self._handles) > 1:
            self.name += f" (× {len(self._handles)})"

    def used(self) -> int:
        return sum(int(self._nvml.nvmlDeviceGetMemoryInfo(h).used) for h in self._handles)

    @classmethod
    def open(cls) -> "GpuMemory | None":
        """The GPUs' memory, or None where there is no NVML or no GPU (a CPU machine)."""
        try:
            import pynvml

            pynvml.nvmlInit()
            return cls(pynvml) if pynvml.nvmlDeviceGetCount() else None
        except Exception:  # no package, no driver, no device: nothing to sample
            return None


class DescendantPeak:
    """While open, samples every ``interval`` seconds the high-water resident memory of
    each process this one has started (the notebook's kernel): ``peak_bytes`` is the
    largest one process reached. The high-water mark only rises, so sampling misses at
    most what a process adds in its last ``interval`` seconds. ``samples`` keeps each
    (wall-clock second, peak so far) at which the peak rose: :func:`peak_by_cell` reads
    from them which cell of the notebook set it.

    With a GPU (``gpu``: a :class:`GpuMemory`, found by default), the same for the GPU
    memory in use above what was in use when sampling began: ``gpu_peak_bytes`` (None
    without a GPU) and ``gpu_samples``. GPU memory has no high-water mark to read, so a
    peak shorter than ``interval`` can be missed: it is a lower bound."""

    def __init__(self, interval: float = 0.5, gpu: "GpuMemory | None | str" = "find"):
        import threading

        self.interval, self.peak_bytes = interval, 0
        self.samples: list[tuple[float, int]] = []
        self._gpu = GpuMemory.open() if gpu == "find" else gpu
        self.gpu_name = self._gpu.name if self._gpu else None
        self.gpu_peak_bytes: int | None = 0 if self._gpu else None
        self.gpu_samples: list[tuple[float, int]] = []
        self._gpu_baseline = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _sample(self) -> None:
        highest = max((high_water_bytes(pid) or 0 for pid in descendants(os.getpid())), default=0)
        if highest > self.peak_bytes:
            self.peak_bytes = highest
            self.samples.append((time.time(), highest))
        if self._gpu:
            above = self._gpu.used() - self._gpu_baseline
            if above > self.gpu_peak_bytes:
                self.gpu_peak_bytes = above
                self.gpu_samples.append((time.time(), above))

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "DescendantPeak":
        if self._gpu:
            self._gpu_baseline = self._gpu.used()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def peak_by_cell(notebook: dict, samples: list[tuple[float, int]], interval: float) -> list[dict]:
    """Each code cell of an executed ``notebook`` (papermill's start and end times) with the
    kernel's high-water memory when it ended and how much it rose while it ran, from a
    :class:`DescendantPeak`'s ``samples``: where a card's rows must come from. A rise is
    seen up to ``interval`` seconds after it happened, so a cell is credited with what the
    samples show until ``interval`` past its end."""
    from datetime import datetime

    def seconds(stamp: str) -> float:
        return datetime.fromisoformat(stamp).timestamp()

    def peak_at(moment: float) -> int:
        return max((peak for when, peak in samples if when <= moment), default=0)

    rows, before = [], 0
    for index, cell in enumerate(notebook["cells"]):
        timing = cell.get("metadata", {}).get("papermill", {})
        if cell["cell_type"] != "code" or not timing.get("end_time"):
            continue
        after = peak_at(seconds(timing["end_time"]) + interval)
        source = "".join(cell["source"]).strip().splitlines()
        rows.append({"cell": index, "first_line": source[0][:100] if source else "", "peak_gb": round(after / 1e9, 3),
                     "rose_gb": round((after - before) / 1e9, 3)})
        before = max(before, after)
    return rows


def _first_at_peak(rows: list[dict]) -> dict | None:
    """The first cell of :func:`peak_by_cell`'s ``rows`` that ended at the peak."""
    row = max(rows, key=lambda r: r["peak_gb"], default=None)
    return row and {k: row[k] for k in ("cell", "first_line", "peak_gb")}


# The book's own artefacts, built from its packaged sources and never from a hub id: the
# same bytes whatever a hub serves, so a dry run may read them. Everything else a chapter
# caches (scores, features, trained heads, corrupted models) is keyed by a hub id, and a
# random-weight model answers to that id in a dry run: sharing it would hand a real paper
# run the dry run's numbers, and let a dry run skip the work it is there to measure.
SHARED_WITH_DRY_RUNS = ("data", "models", "gguf")


def dry_run_cache(folder: Path) -> Path:
    """The chapter cache a dry run writes to (``$REPLBOOK_CACHE``): ``folder``, emptied
    first so that every record comes from a cold cache, holding links to the reader's
    :data:`SHARED_WITH_DRY_RUNS` and nothing else of theirs."""
    import shutil

    if folder.is_symlink() or folder.is_file():
        folder.unlink()
    elif folder.exists():
        shutil.rmtree(folder)  # links inside are removed, never followed
    folder.mkdir(parents=True)
    for name in SHARED_WITH_DRY_RUNS:
        (folder / name).symlink_to(cache_dir(name), target_is_directory=True)
    return folder


def dry_run_parameters(slug: str, overrides: dict[str, Any] | None = None, build: bool = True) -> dict[str, Any]:
    """The papermill parameters of ``slug``'s dry run: the paper preset with
    :data:`OVERRIDES` and ``overrides``; with ``build``, a :data:`FAKE_COCO` value becomes
    the folder's path (built now, once), else it stays a name (what the record shows)."""
    # the paper presets ask for 16 threads (a GPU node's cores); on fewer cores that many
    # threads crowd each other out (chapter 06's first model cell: > 10 min at 16 threads on
    # 2 cores, seconds at 2), so a dry run uses the cores it has
    parameters = {"preset": "paper", "threads": os.cpu_count() or 1, **OVERRIDES.get(slug, {}), **(overrides or {})}
    if build and parameters.get("data") == FAKE_COCO:  # validation images come from train2017, after the training ones
        parameters["data"] = str(fake_coco(parameters["n_train"] + parameters["n_val"], parameters["n_test"]))
    return parameters


def machinery_version() -> str:
    """sha256 (16 hex) of the dry-run code itself (this module and the architectures it
    serves). A record carries it beside the chapter's code version, so a later change to the
    fake hub (a corrected config, a new way to serve a family) shows which records predate it."""
    import hashlib

    digest = hashlib.sha256()
    for module in (__file__, architectures.__file__):
        digest.update(Path(module).read_bytes())
    return digest.hexdigest()[:16]


# glibc raises its mmap threshold each time a block it mapped is freed (mallopt(3)), so once
# chapter 10's first Mask R-CNN pass is freed the later passes' blocks come from the heap,
# and what each leaves behind stays resident: its kernel peaked 0.19 GB higher (1.76 GB
# against 1.56) than with the threshold fixed, memory a GPU's caching allocator would hand
# to the next pass. Fixed at glibc's initial value (128 KiB), a freed large block goes back
# to the system, and the high-water mark counts what was held at once, which is what a card
# estimates. The kernel inherits it; this process's own allocator is untouched.
HOST_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def run(chapter: str, layers: int | None = 1, overrides: dict[str, Any] | None = None,
        root: Path | None = None) -> dict:
    """Execute ``chapter`` at the paper preset on its dry-run models, ``layers`` deep (None:
    full depth); returns (and writes beside the executed notebook) what ran: models, depth,
    seconds, the kernel's peak host memory and, where a GPU is visible, the peak GPU memory."""
    import papermill

    from .paths import notebook_for

    repo = repo_root()
    notebook = notebook_for(chapter, repo)
    slug = notebook.stem
    label = depth_label(layers)  # refuses a depth below one before anything is built
    machinery = machinery_version()  # before the run: the code that serves its models
    parameters = dry_run_parameters(slug, overrides)
    names = paper_models(slug, parameters)
    start = time.perf_counter()
    hub = fake_hub(names, layers)
    built = time.perf_counter() - start
    out_dir = (root or repo / "runs" / "dryrun") / label
    out_dir.mkdir(parents=True, exist_ok=True)
    chapter_cache = dry_run_cache(out_dir / "cache" / slug)  # after fake_hub: the hub stays the reader's
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                                                "REPLBOOK_RESULTS_DIR", "REPLBOOK_CACHE", *HOST_ALLOCATOR)}
    os.environ.update({"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "REPLBOOK_RESULTS_DIR": str(out_dir / "results"), "REPLBOOK_CACHE": str(chapter_cache),
                       **HOST_ALLOCATOR})
    from .runner import busy_share

    busy = busy_share()  # other work on the CPU inflates the seconds recorded below
    start = time.perf_counter()
    try:
        with DescendantPeak() as kernel:
            papermill.execute_notebook(str(notebook), str(out_dir / notebook.name), kernel_name="python3",
                                       cwd=str(notebook.parent), parameters=parameters, progress_bar=False)
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    executed = json.loads((out_dir / notebook.name).read_text())
    by_cell = peak_by_cell(executed, kernel.samples, kernel.interval)
    gpu_by_cell = peak_by_cell(executed, kernel.gpu_samples, kernel.interval) if kernel.gpu_peak_bytes is not None else []
    # the cell that raised the high-water mark most (what the chapter's card must explain),
    # and the first cell that ended at the peak: not always the same cell (06's model load
    # rises most, its covariance cell sets the peak on top of it)
    largest_rise = max(by_cell, key=lambda row: row["rose_gb"], default=None)
    at_peak = _first_at_peak(by_cell)
    record = {"chapter": slug, "dry_run": "random weights from the public configs: no number here is the paper's",
              "layers": layers, "machinery": machinery,
              "models": {n: architectures.architecture(n).hub_id for n in names},
              "parameters_built": {n: architectures.parameter_count(n, served_depth(n, layers)) for n in names},
              **({"image_size": {n: served_image_size(n) for n in names if architectures.architecture(n).parts}}
                 if any(architectures.architecture(n).parts for n in names) else {}),
              "overrides": dry_run_parameters(slug, overrides, build=False), "build_seconds": round(built, 1),
              "run_seconds": round(time.perf_counter() - start, 1), "kernel_peak_bytes": kernel.peak_bytes,
              "largest_rise": largest_rise and {k: largest_rise[k] for k in ("cell", "first_line", "rose_gb")},
              "peak_cell": at_peak,
              **({"gpu": kernel.gpu_name, "gpu_peak_bytes": kernel.gpu_peak_bytes,
                  "gpu_peak_cell": _first_at_peak(gpu_by_cell)} if kernel.gpu_peak_bytes is not None else {}),
              "chapter_cache": "cold: its own, emptied before the run (dryrun.dry_run_cache)",
              # records without it ran under glibc's default (chapter 10 peaked 0.19 GB higher under it)
              "host_allocator": "glibc, " + ", ".join(f"{k}={v}" for k, v in HOST_ALLOCATOR.items())
                                + " (fixed: a freed large block goes back to the system)",
              # the share of the CPU other work used in the second before the run (the load
              # average is no guide here: torch's idle threads lift it to 6–11 on an idle 2-core machine)
              "cpu_busy_before_run": round(busy, 2)}
    # the whole profile beside the executed notebook (not in the committed record: it is long)
    (out_dir / f"{slug}.dryrun.json").write_text(json.dumps(
        {**record, "high_water_by_cell": by_cell, **({"gpu_by_cell": gpu_by_cell} if gpu_by_cell else {})}, indent=1))
    return record


def record(entry: dict, path: Path | None = None) -> Path:
    """Add a dry run's entry to the committed record of dry runs on this kind of machine
    (``kernels/measurements/paper_dryrun_<device>.json``, keyed by chapter and depth),
    stamped with the chapter's code version and the date."""
    import platform

    import torch

    from .results import code_version, write_atomic

    device = torch.cuda.get_device_name(0).split()[-1].lower() if torch.cuda.is_available() else "cpu"
    path = path or repo_root() / "kernels" / "measurements" / f"paper_dryrun_{device}.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved[f"{entry['chapter']}|{depth_label(entry['layers'])}"] = {
        **entry, "code_version": code_version(entry["chapter"], repo_root()), "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores" + (f", {device}" if device != "cpu" else "")}
    write_atomic(path, dict(sorted(saved.items())))
    path.chmod(0o644)
    return path
