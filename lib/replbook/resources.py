"""Resource cards: what each chapter's ``paper`` preset needs, computed from the paper
models' public configurations (:mod:`replbook.architectures`) and the preset's own numbers
(issue #29, item 2). Nothing here is measured on the paper's models: a card is arithmetic,
each row with the formula that made it, so a reader can check it and a code change that
moves a workload moves its card.

Memory (decimal GB, 1e9 bytes):

- **weights**: parameters × bytes of the precision the preset loads them in *today* (a
  causal LM loads in float32 unless the chapter asks otherwise: ``models._from_pretrained``),
  summed over the models held at once;
- **training state** for the parameters a chapter trains: gradient (same precision) plus
  AdamW's two moments in float32 (8 bytes);
- **activations**: a transformer layer keeps ``s·b·h·(34 + 5·a·s/h)`` bytes for the backward
  pass in 16-bit precision (Korthikanti et al. 2022, eq. 1; twice that in float32), only
  where a chapter back-propagates through one; inference holds the **KV cache**,
  ``2 · layers · kv_heads · head_dim · s · b`` values;
- **disk**: the hub checkpoint (its parameters at the precision it is stored in) plus any
  files the chapter writes (chapter 04's offloaded bitmaps).

Stable Diffusion's UNet and VAE (chapter 05) have no such formula; their phases are
counted instead, on the models built from their configs on the meta device (no weights,
no arithmetic): the tensors autograd keeps for a backward pass
(:func:`saved_for_backward`) and the tensors alive at once without gradients
(:func:`peak_live_bytes`), attention keeping what a fused kernel keeps.

Where no formula covers a step — what chapter 04's pruning and bitmap decoding take per
element of a weight, chapter 07's compiled BCH code and ONNX watermarker, one image through
chapter 10's detector — a row carries a number
measured on the CPU with the chapter's own functions, says "measured", and a test in
``tests/test_resources.py`` measures it again.

Time is a **lower bound**: ``2 · N · tokens`` FLOPs (``6 · N · tokens`` when training) at
an H100's dense bf16 peak, 989 TFLOP/s; real runs are several times slower. Rows that no
formula here covers say so ("not estimated"): a card never guesses.

``replbook resources`` prints the cards; the how-to-run page carries their table between
markers, and a test fails when it differs from what this module computes.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from . import architectures

GB = 1e9
H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM (NVIDIA's data sheet)
BYTES = architectures.BYTES


@dataclass
class Row:
    what: str
    formula: str
    gigabytes: float | None  # None: not estimated
    # None: held throughout the run; a name: held only during that phase of it (phases do
    # not overlap, so a card's peak adds the largest phase to what is held throughout)
    phase: str | None = None
    # False for a checkpoint mapped while it loads in its own precision: on the CPU its
    # pages are the weights themselves (:func:`mapped_while_loading`), so a run there holds
    # it once, in the weights' row, and a CPU dry run's card leaves it out
    beside_weights_on_cpu: bool = True


def peak_of(rows: list[Row]) -> float | None:
    """What ``rows`` hold at once at their peak: every row held throughout, plus the
    largest phase (its rows summed); None when no row is estimated."""
    known = [r for r in rows if r.gigabytes is not None]
    if not known:
        return None
    phases: dict[str, float] = {}
    for r in known:
        if r.phase is not None:
            phases[r.phase] = phases.get(r.phase, 0.0) + r.gigabytes
    return sum(r.gigabytes for r in known if r.phase is None) + max(phases.values(), default=0.0)


@dataclass
class Card:
    chapter: str
    device: str  # where the paper preset runs today
    gpu: list[Row] = field(default_factory=list)  # what a GPU (or the CPU, when it runs there) holds at the peak
    host: list[Row] = field(default_factory=list)  # host memory beyond that, as the preset loads
    disk: list[Row] = field(default_factory=list)
    flops: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gb(self) -> float | None:
        return peak_of(self.gpu)

    @property
    def host_gb(self) -> float | None:
        return peak_of(self.host)

    @property
    def disk_gb(self) -> float | None:
        return peak_of(self.disk)

    @property
    def hours_at_peak(self) -> float | None:
        return None if self.flops is None else self.flops / H100_BF16_FLOPS / 3600


# the depth the hub models are sized at: None (their published depth) for the cards, a dry
# run's depth when a card is set beside that run's measured memory (:func:`card`'s ``layers``)
_DEPTH: ContextVar[int | None] = ContextVar("resources_depth", default=None)


@contextmanager
def _at_depth(layers: int | None):
    token = _DEPTH.set(layers)
    try:
        yield
    finally:
        _DEPTH.reset(token)


def _served_layers(name: str) -> int | None:
    """How deep ``name`` is sized: as published, or as a dry run at ``_DEPTH`` serves it
    (open_clip models are served at full depth: :func:`replbook.dryrun.served_depth`)."""
    layers = _DEPTH.get()
    if layers is None:
        return None
    from .dryrun import served_depth

    return served_depth(name, layers)


def params(name: str) -> int:
    return architectures.parameter_count(name, _served_layers(name))


def num_layers(name: str) -> int:
    """The transformer layers of ``name`` (its language side's, for a composite) as sized."""
    published = _text(architectures.architecture(name).config)["num_hidden_layers"]
    served = _served_layers(name)
    return published if served is None else min(published, served)


def weights(name: str, dtype: str, copies: int = 1) -> Row:
    n = params(name)
    label = architectures.architecture(name).hub_id
    times = f"{copies} × " if copies > 1 else ""
    return Row(f"{label} weights ({dtype})", f"{times}{n / 1e9:.3f} B params × {BYTES[dtype]} B",
               copies * n * BYTES[dtype] / GB)


def checkpoint(name: str, stored: str | None = None) -> Row:
    """``name``'s files on the hub, at ``stored`` precision (default the registry's, the
    paper's: what the hub holds for every model but Stable Diffusion's)."""
    arch = architectures.architecture(name)
    n, stored = params(name), stored or arch.dtype
    return Row(f"{arch.hub_id} checkpoint", f"{n / 1e9:.3f} B params × {BYTES[stored]} B ({stored})",
               n * BYTES[stored] / GB)


def mapped_while_loading(names, stored: str | None = None, loaded: str | None = None) -> Row:
    """The largest of ``names``' checkpoints, resident beside its model while it loads:
    safetensors memory-maps the file and ``from_pretrained`` (or open_clip) copies each
    weight out of it (converting its precision, or moving it to a GPU), so the mapped pages
    count in the process's memory until the load ends. Measured on the dry run's models:
    the high-water mark of a load is the model plus its checkpoint's size when the precision
    changes (``tests/test_resources.py``). Host memory, and only for the load (``phase``).

    Read in its own precision (``loaded``, on the CPU) nothing is copied: diffusers keeps
    safetensors' tensors over the mapped file as the weights, and their pages fault in as
    a pass first reads them (measured: a float32 UNet from a float32 file raised the
    high-water mark by about half a byte a parameter while it loaded, and by four and a half
    once every weight had been read, not by eight). There the row is the weights' own pages:
    ``beside_weights_on_cpu`` is False, and a CPU run does not add it."""
    largest = max(dict.fromkeys(names), key=lambda n: params(n) * BYTES[stored or architectures.architecture(n).dtype])
    row = checkpoint(largest, stored)
    own = loaded is not None and loaded == (stored or architectures.architecture(largest).dtype)
    return Row(f"{row.what}, mapped while it loads" + (" (on the CPU: the weights' own pages)" if own else ""),
               row.formula, row.gigabytes, phase="loading", beside_weights_on_cpu=not own)


def adamw_state(what: str, trained: int, dtype: str) -> Row:
    per = BYTES[dtype] + 8
    return Row(f"{what}: gradients + AdamW moments", f"{trained / 1e9:.3f} B trained × ({BYTES[dtype]} + 8) B",
               trained * per / GB)


def _text(config: dict) -> dict:
    return config.get("text_config", config)


def kv_cache(name: str, tokens: int, batch: int, dtype: str) -> Row:
    c = _text(architectures.architecture(name).config)
    layers, heads = num_layers(name), c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads", heads)
    head_dim = c.get("head_dim", c["hidden_size"] // heads)
    values = 2 * layers * kv_heads * head_dim * tokens * batch
    return Row(f"KV cache, {tokens} tokens × batch {batch}",
               f"2 × {layers} layers × {kv_heads} × {head_dim} × {tokens} × {batch} × {BYTES[dtype]} B",
               values * BYTES[dtype] / GB)


def activations(what: str, layers: int, hidden: int, heads: int, tokens: int, batch: int, dtype: str) -> Row:
    """Korthikanti et al. (2022), eq. 1: s·b·h·(34 + 5·a·s/h) bytes per layer in 16 bits."""
    per_layer = tokens * batch * hidden * (34 + 5 * heads * tokens / hidden)
    scale = BYTES[dtype] / 2
    return Row(f"{what}: activations for backward ({dtype})",
               f"{layers} × {tokens}·{batch}·{hidden}·(34 + 5·{heads}·{tokens}/{hidden}) × {scale:g}",
               layers * per_layer * scale / GB)


def checkpointed_activations(what: str, layers: int, hidden: int, heads: int, tokens: int, batch: int,
                             dtype: str) -> Row:
    """With activation checkpointing per layer (Chen et al. 2016): every layer's input
    (``s·b·h`` values) and, while one layer's backward runs, that layer's activations
    recomputed (:func:`activations` for one layer)."""
    inputs = layers * tokens * batch * hidden * BYTES[dtype]
    one = activations(what, 1, hidden, heads, tokens, batch, dtype)
    return Row(f"{what}: layer inputs + one layer's activations, recomputed ({dtype})",
               f"{layers} × {tokens}·{batch}·{hidden} × {BYTES[dtype]} B + {one.formula}",
               inputs / GB + one.gigabytes)


@contextmanager
def _fused_attention():
    """While a model runs on the meta device, attention keeps for the backward pass what a
    fused kernel keeps — queries, keys, values, the output and one log-sum-exp per query
    row — and makes no attention matrix: PyTorch's meta dispatch always takes the math
    path, which would. The chapters' kernels take a fused path (the CPU's flash kernel in
    float32; on a GPU the memory-efficient one, or flash in 16 bits), and these five are
    what each keeps. ``tests/test_resources.py`` checks the counts against real tensors."""
    import torch
    import torch.nn.functional as F

    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, key, value):
            out = query.new_empty(*query.shape[:-1], value.shape[-1])
            log_sum_exp = query.new_empty(query.shape[:-1], dtype=torch.float32)
            ctx.save_for_backward(query, key, value, out, log_sum_exp)
            return out

        @staticmethod
        def backward(ctx, grad):  # pragma: no cover - only the forward's bookkeeping is used
            query, key, value, _, _ = ctx.saved_tensors
            return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)

    def stand_in(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        return Attention.apply(query, key, value)

    original, F.scaled_dot_product_attention = F.scaled_dot_product_attention, stand_in
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def saved_for_backward(model, call) -> int:
    """Bytes autograd keeps for the backward pass while ``call()`` runs ``model``: the
    storage of every tensor an operation on the gradient's path saves, each counted once
    however many views of it are saved, ``model``'s parameters and buffers left out (they
    are the weights' row). On the meta device it counts without computing; attention
    keeps what a fused kernel keeps (:func:`_fused_attention`). It leaves out what is
    transient: the gradients the backward pass makes and frees as it goes."""
    import torch

    weights = {id(t) for t in (*model.parameters(), *model.buffers())}
    kept: dict[int, torch.Tensor] = {}

    def pack(tensor):
        base = tensor if tensor._base is None else tensor._base
        if id(base) not in weights:
            kept[id(base)] = base  # held, so that its id is not reused
        return tensor

    with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        call()
    return sum(t.untyped_storage().nbytes() for t in kept.values())


def peak_live_bytes(call) -> int:
    """The most bytes of tensors alive at once while ``call()`` runs without gradients:
    every tensor an operation makes is counted from its making until no Python object
    holds its storage (views share it); tensors made before the call (the weights) are
    not counted, inputs made inside it are. On the meta device it counts without
    computing, attention as a fused kernel runs it (:func:`_fused_attention`). Without
    gradients no tensor outlives its Python objects, which is what makes the count whole."""
    import weakref

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Live(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.storages: dict[int, list[int]] = {}  # storage -> [bytes, Python tensors holding it]
            self.counted = weakref.WeakKeyDictionary()
            self.now = self.peak = 0

        def release(self, key):
            entry = self.storages[key]
            entry[1] -= 1
            if entry[1] == 0:
                self.now -= entry[0]
                del self.storages[key]

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in tree_flatten(out)[0]:
                if not isinstance(tensor, torch.Tensor) or tensor in self.counted:
                    continue  # an in-place operation hands back a tensor already counted
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self.storages:
                    self.storages[key] = [storage.nbytes(), 0]
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)
                self.storages[key][1] += 1
                self.counted[tensor] = True
                weakref.finalize(tensor, self.release, key)
            return out

    live = Live()
    with torch.no_grad(), _fused_attention(), live:
        call()
    return live.peak


def _sd_part(pipeline: str, family: str) -> str:
    return next(p for p in architectures.architecture(pipeline).parts
                if architectures.architecture(p).family == family)


def _text_tokens(pipeline: str) -> int:
    """The text states a Stable Diffusion UNet attends to: its text encoder's full length
    (77), to which the pipeline pads every prompt."""
    return architectures.architecture(_sd_part(pipeline, "clip-text")).config["max_position_embeddings"]


def _sd_part_built(part: str, layers: int | None):
    """A Stable Diffusion part on the meta device in float32 (chapter 05 loads it so), at
    ``layers`` deep and, for a UNet served by a dry run, at 1/SD_SHRINK of its sample size."""
    model = architectures.build(part, layers, device="meta", dtype="float32").requires_grad_(False)
    if layers is not None and architectures.architecture(part).family == "sd-unet":
        from .dryrun import SD_SHRINK

        model.register_to_config(sample_size=model.config.sample_size // SD_SHRINK)
    return model


@lru_cache(maxsize=None)
def unet_backward_bytes(pipeline: str, batch: int, layers: int | None) -> int:
    """What ``pipeline``'s UNet (frozen) keeps for the backward pass of one denoising step
    on ``batch`` latents at its sample size, the gradient flowing to the text states it
    attends to (:func:`_text_tokens`): chapter 05's C1 optimisation and projection training
    (:func:`saved_for_backward`, on the meta device: seconds, no weights)."""
    import torch

    unet = _sd_part_built(_sd_part(pipeline, "sd-unet"), layers)
    size, channels = unet.config.sample_size, unet.config.in_channels
    with torch.device("meta"):
        latents, steps = torch.zeros(batch, channels, size, size), torch.zeros(batch, dtype=torch.long)
        states = torch.zeros(batch, _text_tokens(pipeline), unet.config.cross_attention_dim, requires_grad=True)
    return saved_for_backward(unet, lambda: unet(latents, steps, encoder_hidden_states=states))


@lru_cache(maxsize=None)
def vae_encode_bytes(pipeline: str, images: int, layers: int | None) -> int:
    """Peak working memory of ``pipeline``'s VAE encoding ``images`` images in one batch at
    the pipeline's resolution, the images included (:func:`peak_live_bytes`)."""
    import torch

    vae = _sd_part_built(_sd_part(pipeline, "sd-vae"), layers)
    px = _sd_pixels(pipeline, layers)

    def encode():
        vae.encode(torch.zeros(images, 3, px, px, device="meta")).latent_dist.mean

    return peak_live_bytes(encode)


@lru_cache(maxsize=None)
def unet_forward_bytes(pipeline: str, latents: int, layers: int | None) -> int:
    """Peak working memory of ``pipeline``'s UNet on ``latents`` latents with no gradient
    (:func:`peak_live_bytes`)."""
    import torch

    unet = _sd_part_built(_sd_part(pipeline, "sd-unet"), layers)
    size, channels = unet.config.sample_size, unet.config.in_channels

    def forward():
        noised = torch.zeros(latents, channels, size, size, device="meta")
        states = torch.zeros(latents, _text_tokens(pipeline), unet.config.cross_attention_dim, device="meta")
        unet(noised, torch.zeros(latents, dtype=torch.long, device="meta"), encoder_hidden_states=states)

    return peak_live_bytes(forward)


def guided_step_bytes(pipeline: str, batch: int, layers: int | None) -> int:
    """Peak working memory of one guided sampling step on ``batch`` prompts: classifier-free
    guidance runs ``pipeline``'s UNet on ``2 × batch`` latents, the conditional and the
    unconditional halves (``t2icomp.generate``)."""
    return unet_forward_bytes(pipeline, 2 * batch, layers)


@lru_cache(maxsize=None)
def vae_decode_bytes(pipeline: str, batch: int, layers: int | None) -> int:
    """Peak working memory of ``pipeline``'s VAE decoding ``batch`` latents to pixels."""
    import torch

    vae = _sd_part_built(_sd_part(pipeline, "sd-vae"), layers)
    size = _sd_pixels(pipeline, layers) // 2 ** (len(vae.config.block_out_channels) - 1)
    return peak_live_bytes(
        lambda: vae.decode(torch.zeros(batch, vae.config.latent_channels, size, size, device="meta")).sample)


def _scene_count() -> int:
    from .t2icomp import all_scenes

    return len(all_scenes())


def _sd_pixels(pipeline: str, served: int | None) -> int:
    """The pixels a Stable Diffusion ``pipeline`` draws at, as a dry run serves it when
    ``served`` (a depth) is given (``dryrun.sd_pixels``)."""
    from .dryrun import sd_pixels

    return sd_pixels(pipeline, served=served is not None)


def _during(row: Row, phase: str) -> Row:
    """``row``, held only during ``phase`` of the run (see :func:`peak_of`)."""
    row.phase = phase
    return row


def _preset(slug: str) -> dict:
    from .paths import chapter_module, repo_root

    return chapter_module(repo_root() / "notebooks" / f"{slug}.ipynb").PRESETS["paper"]


def _mlp_params(name: str, layers: tuple[int, int]) -> int:
    c = _text(architectures.architecture(name).config)
    return 3 * c["hidden_size"] * c["intermediate_size"] * (layers[1] - layers[0])


# ----------------------------------------------------------------------------- the cards


def card(slug: str, overrides: dict | None = None, layers: int | None = None) -> Card:
    """``slug``'s card for its paper preset; with ``overrides`` (parameters changed, as a run
    would pass them) and ``layers`` (the hub models sized that many layers deep, as a dry
    run serves them), the card of that run: what :func:`against_dry_run` compares."""
    build = CARDS.get(slug)
    if build is None:
        raise ValueError(f"chapter={slug!r}: no resource card; cards exist for {', '.join(sorted(CARDS))}")
    with _at_depth(layers):
        return build({**_preset(slug), **(overrides or {})})


def _zoo(p) -> Card:
    c = Card("00_model_zoo", "CUDA when present (device='auto')")
    # every language model stays loaded (the completions and next-token tables read them all)
    c.gpu = [*(weights(m, "float32") for m in p["language_models"]), weights(p["sentence_model"], "float32")]
    c.host = [mapped_while_loading([*p["language_models"], p["sentence_model"]])]
    c.disk = [checkpoint(m) for m in [*p["language_models"], p["sentence_model"]]]
    c.notes.append("the language models stay loaded together; a few tokens each: seconds on any machine; "
                   "EfficientNet-Lite0 (a few million parameters) is not counted")
    return c


def _restor(p) -> Card:
    c = Card("01_restor", "GPU when present (device auto), one device" if p["device"] == "auto" else p["device"])
    name = p["model_name"]
    lo, hi = p["trainable_layers"]
    band = _mlp_params(name, (lo, hi))
    # every copy the chapter holds shares the clean model's frozen weights (restor.band_copy)
    # and owns only the trained band: one corrupted model per k of mix_k (the notebook keeps
    # them all), the copy being unlearned, the best of the learning rates tried so far, and
    # the best checkpoint inside the run (the task vector's fine-tuned band instead)
    copies = len(p["mix_k"]) + 3
    # the copies, the optimiser and the activations come after the load (phase "training")
    c.gpu = [weights(name, "float32"),
             Row(f"band copies: MLPs of layers {lo}–{hi} (float32)", f"{copies} × {band / 1e9:.3f} B params × 4 B",
                 copies * band * 4 / GB, phase="training"),
             _during(adamw_state(f"MLPs of layers {lo}–{hi}", band, "float32"), "training"),
             Row("activations", "sequence length set by the retain documents", None, phase="training")]
    c.host = [mapped_while_loading([name])]
    c.disk = [checkpoint(name)]
    c.notes.append(f"float32 on one device; the copies share the frozen weights and own only the {hi - lo}-layer "
                   "band that learns (the paper trains LoRA on all modules instead)")
    return c


def _skillslices(p) -> Card:
    c = Card("02_skill_slices", "CUDA when present (device='auto')")
    biggest = max(p["models"], key=params)
    c.gpu = [weights(biggest, "float32"), weights(p["sentence_model"], "float32")]
    c.host = [mapped_while_loading([*p["models"], p["rationale_model"], p["sentence_model"]])]
    c.disk = [checkpoint(m) for m in dict.fromkeys([*p["models"], p["rationale_model"], p["sentence_model"]])]
    c.notes.append("multiple-choice scoring and short rationales: inference only")
    return c


def _intcoop(p) -> Card:
    c = Card("03_intcoop", "CUDA when present (device='auto')" if p["device"] == "auto" else p["device"])
    name = "timm/vit_base_patch16_clip_224.openai"
    text = architectures.architecture(name).config["text_config"]
    # the text tower encodes a prompt per colour attribute per base class (the first half of
    # a dataset's classes, CoCoOp's split: intcoop.Dataset.base), for the largest dataset
    from .cliplike import COLOURS
    from .data import CIFAR10_CLASSES, FASHION_MNIST_CLASSES
    classes = {"cifar10": len(CIFAR10_CLASSES), "fashion-tinted": len(FASHION_MNIST_CLASSES)}
    prompts = len(COLOURS) * max(classes[d] // 2 for d in p["datasets"])
    c.gpu = [weights(name, "float32"),
             _during(activations(f"text tower over {prompts} prompts", text["num_hidden_layers"], text["hidden_size"],
                                 text["num_attention_heads"], text["max_position_embeddings"], prompts, "float32"),
                     "training"),
             _embedding_pass(name, _clip_batch())]  # the images, a batch at a time (cliplike.OpenClip), before training
    c.host = [mapped_while_loading([name])]
    c.disk = [checkpoint(name)]
    c.notes.append("CLIP and the prompt learners on the device; the image features cached on the host; only the "
                   "context vectors and the attribute head learn (a few thousand parameters)")
    return c


# Chapter 04's sweep cell prunes, swaps, writes and round-trips one weight at a time; what
# one weight costs beyond the pruned set, per element of the largest weight (the largest
# holds most), measured with endor's own functions (tests/test_resources.py):
ENDOR_PRUNE_BYTES = 12  # float32 scores, top-k's values and int64 indices, the clone (endor.prune)
ENDOR_ROUND_TRIP_BYTES = 24  # bitmap encode → file bytes → parse → decode (endor.round_trip_exact)
ENDOR_DECODE_BYTES = 24  # decoding one bitmap back to dense (endor.decode): most of the round trip


@lru_cache(maxsize=None)
def _prunable(name: str, layers: int | None) -> tuple[int, int]:
    """(elements in all, elements in the largest) of ``name``'s decoder-block linears at
    ``layers`` deep: what chapter 04 prunes (:func:`replbook.endor.prunable_linears`, on the
    model built on the meta device)."""
    from .endor import prunable_linears

    sizes = [linear.weight.numel() for linear in
             prunable_linears(architectures.build(name, layers=layers, device="meta")).values()]
    return sum(sizes), max(sizes)


def _endor_phases(p) -> list[Row]:
    """Host memory of chapter 04, phase by phase. One model is in memory at a time: each
    cell loads the model it measures (rounded to the storage dtype) and lets it go, so every
    phase holds one model's weights and what that step builds beside them; a phase's rows are
    those of the model for which they add up to the most.

    - loading: the checkpoint stays mapped while the weights are copied out of it;
    - the sweep (for each pruner and sparsity): one pruned set at a time, built from the
      model's own weights without a copy (``endor.linear_weights``), swapped in without one
      (``endor.weights_swapped``; only a load dtype other than the storage dtype casts the
      set), written in every format and round-tripped one weight at a time;
    - C2's decode timing: the operating set, and its encoded copy (``endor.decode_throughput``);
    - C3: the operating set pruned again and swapped in while the offload files are written;
      the model then goes before the offloaded runs read the files."""
    load, stored = p["load_dtype"], p["storage_dtype"]
    value_bits, kept = 8 * BYTES[stored], 1 - p["operating_sparsity"]
    swept, offloaded = list(dict.fromkeys(p["model_names"])), list(dict.fromkeys(p["offload_model_names"]))

    def model(n):
        return weights(n, load)

    def pruned_set(n, what):
        total = _prunable(n, _served_layers(n))[0]
        return Row(f"{architectures.architecture(n).hub_id} {what} ({stored})", f"{total / 1e9:.3f} B × {BYTES[stored]} B",
                   total * BYTES[stored] / GB)

    def cast(n):  # weights_swapped casts the set to the model's dtype, a copy only if it differs
        if load == stored:
            return []
        total = _prunable(n, _served_layers(n))[0]
        return [Row(f"{architectures.architecture(n).hub_id} the set cast to {load} while swapped in",
                    f"{total / 1e9:.3f} B × {BYTES[load]} B", total * BYTES[load] / GB)]

    def largest(n, what, per_element):
        elements = _prunable(n, _served_layers(n))[1]
        return Row(f"{architectures.architecture(n).hub_id} {what} of its largest weight",
                   f"{elements / 1e6:.0f} M × {per_element} B (measured)", elements * per_element / GB)

    def encoded(n):
        total = _prunable(n, _served_layers(n))[0]
        return Row(f"{architectures.architecture(n).hub_id} its operating set encoded, to time decoding",
                   f"{total / 1e9:.3f} B × (1 + {value_bits}·{kept:g}) bits / 8", total * (1 + value_bits * kept) / 8 / GB)

    steps = {
        "loading": (list(dict.fromkeys(swept + offloaded)),
                    lambda n: [model(n), mapped_while_loading([n])]),
        "pruning": (swept, lambda n: [model(n), pruned_set(n, "pruned set, being built"),
                                      largest(n, "pruning", ENDOR_PRUNE_BYTES)]),
        "swapped": (swept, lambda n: [model(n), pruned_set(n, "pruned set swapped in"), *cast(n)]),
        "round trip": (swept, lambda n: [model(n), pruned_set(n, "pruned set, written and read back"),
                                         largest(n, "round trip", ENDOR_ROUND_TRIP_BYTES)]),
        "timing decode": (offloaded, lambda n: [model(n), pruned_set(n, "operating set"), encoded(n),
                                                largest(n, "decoding", ENDOR_DECODE_BYTES)]),
        "writing the offload files": (offloaded, lambda n: [model(n), pruned_set(n, "operating set swapped in"),
                                                            *cast(n)]),
    }
    rows = []
    for phase, (names, held) in steps.items():
        heaviest = max(names, key=lambda n: sum(r.gigabytes for r in held(n)))
        rows += [_during(r, phase) for r in held(heaviest)]
    return rows + [_during(Row("an offloaded model's layer and its decoding, while it generates (the model in "
                               "memory let go)", "not estimated", None), "offloaded generation")]


def _endor_streamed_passes(p) -> list[Row]:
    """Device memory of chapter 04's perplexity passes and Wanda's calibration
    (``endor.streamed``): what stays on the device (every tensor outside the decoder blocks:
    the embeddings, final norm and head), one streamed weight at a time (Accelerate's hooks
    move each linear's weight in for its own pass and drop it after), the MLP's widest
    intermediates and one window's logits, cast to float32 for the loss (``lm.perplexity``);
    charged to the model for which they add up to the most."""
    from .endor import BLOCK

    load = p["load_dtype"]

    def in_a_block(weight: str) -> bool:
        """A weight inside a decoder block, as ``endor.streamed`` finds the blocks it streams."""
        parts = weight.split(".")
        return any(BLOCK.fullmatch(".".join(parts[:i])) for i in range(1, len(parts)))

    def held(n):
        c = _text(architectures.architecture(n).config)
        label = architectures.architecture(n).hub_id
        in_blocks = sum(t.numel() for name, t in architectures.build(n, layers=_served_layers(n), device="meta")
                        .state_dict().items() if in_a_block(name))
        resident = params(n) - in_blocks
        largest = _prunable(n, _served_layers(n))[1]
        wide = c.get("intermediate_size", c.get("ffn_dim"))
        return [Row(f"{label} resident: everything outside the decoder blocks ({load})",
                    f"{resident / 1e9:.3f} B × {BYTES[load]} B", resident * BYTES[load] / GB),
                Row(f"{label} one streamed weight, its largest", f"{largest / 1e6:.0f} M × {BYTES[load]} B",
                    largest * BYTES[load] / GB),
                Row(f"{label} the MLP's intermediates, one window", f"3 × {p['window']} × {wide} × {BYTES[load]} B",
                    3 * p["window"] * wide * BYTES[load] / GB),
                Row(f"{label} one window's logits, and their float32 copy",
                    f"{p['window']} × {c['vocab_size']} × ({BYTES[load]} + 4) B",
                    p["window"] * c["vocab_size"] * (BYTES[load] + 4) / GB)]

    by_model = {n: held(n) for n in dict.fromkeys(p["model_names"] + p["offload_model_names"])}
    heaviest = max(by_model.values(), key=lambda rows: sum(r.gigabytes for r in rows))
    return [_during(r, "perplexity and calibration") for r in heaviest]


def _endor(p) -> Card:
    c = Card("04_endor", p["device"])
    names = p["model_names"]
    sparsity = p["operating_sparsity"]
    value_bits = 8 * BYTES[p["storage_dtype"]]
    load = p["load_dtype"]
    c.gpu = [_during(Row("one decoder layer at a time, streamed from host or disk", "largest layer of the two models",
                         None), "offloaded generation"),
             _during(kv_cache(max(names, key=params), p["window"], 1, load), "offloaded generation")]
    c.gpu += _endor_streamed_passes(p)
    c.host = _endor_phases(p)
    c.disk = [checkpoint(n) for n in names] + [
        Row(f"{architectures.architecture(n).hub_id} offloaded bitmaps at sparsity {sparsity}",
            f"{params(n) / 1e9:.3f} B × (1 + {value_bits}·{1 - sparsity:g}) bits / 8",
            params(n) * (1 + value_bits * (1 - sparsity)) / 8 / GB) for n in p["offload_model_names"]]
    c.notes.append("one model in host memory at a time, with one pruned set beside it; perplexity and Wanda's "
                   f"calibration run on the {'GPU' if p['device'] == 'cuda' else 'CPU'} in {load}, the decoder blocks' weights streamed from "
                   "host memory one layer's pass at a time (endor.streamed)")
    return c


def _t2icomp(p) -> Card:
    c = Card("05_t2i_composition", "CUDA when present")
    backbone = {"stable-diffusion-v1-4": "CompVis/stable-diffusion-v1-4",
                "stable-diffusion-2-1": "stabilityai/stable-diffusion-2-1"}.get(p["backbone"], p["backbone"])
    # models.diffusion_parts loads every part in float32 (no dtype asked), from the
    # repository's main revision, which holds float32 (float16 is its "fp16" variant; the
    # dry run serves it so)
    served = _served_layers(backbone)
    px = _sd_pixels(backbone, served)
    scenes = _scene_count()
    c.gpu = [weights(backbone, "float32")]
    # the phases follow one another; in each, what is counted on the meta device
    # (resources.peak_live_bytes, resources.saved_for_backward; float32, fused attention)
    encoded = min(p["encode_batch"], scenes)
    c.gpu.append(_during(Row(f"VAE encoding the {scenes} scenes {encoded} at a time at {px} px (encode_batch; "
                             "t2icomp.cross_fitted_projection encodes the training and held-out scenes together)",
                             f"peak of the tensors alive at once, {encoded} images (the images included)",
                             vae_encode_bytes(backbone, encoded, served) / GB), "encoding"))
    # the UNet back-propagates to the text states in C1 (optimize_chunk held-out prompts per
    # backward pass, optimize_views noised copies each: t2icomp.backward_in_chunks) and in the
    # projections' training (projection_batch pairs a step)
    chunk = min(p["optimize_chunk"], p["held_out"])
    for phase, images, what in (("C1's optimisation", chunk * p["optimize_views"],
                                 f"{chunk} of {p['held_out']} prompts (optimize_chunk) × {p['optimize_views']} "
                                 f"view{'s' if p['optimize_views'] != 1 else ''} "
                                 "per backward pass"),
                                ("projection training", p["projection_batch"], f"batch {p['projection_batch']}")):
        c.gpu.append(_during(Row(f"UNet activations kept for backward, {phase}: {what} at {px} px",
                                 f"the tensors autograd saves for {images} images (the backward's transient "
                                 "gradients not counted)", unet_backward_bytes(backbone, images, served) / GB), phase))
    c.gpu.append(_during(Row(f"sampling: the UNet on {2 * p['sample_batch']} latents (guidance doubles "
                             f"sample_batch {p['sample_batch']}), then the VAE decoding {p['sample_batch']} images",
                             "peak of the tensors alive at once, the larger of the two",
                             max(guided_step_bytes(backbone, p["sample_batch"], served),
                                 vae_decode_bytes(backbone, p["sample_batch"], served)) / GB), "sampling"))
    c.gpu.append(_during(Row(f"scoring: the held-out denoising loss, the UNet on all {p['held_out']} held-out latents "
                             "at once (t2icomp.held_out_loss, no gradient)", "peak of the tensors alive at once",
                             unet_forward_bytes(backbone, p["held_out"], served) / GB), "scoring"))
    # each part loads from its own subfolder: the largest part's file is mapped at once
    c.host = [mapped_while_loading(architectures.architecture(backbone).parts, stored="float32", loaded="float32")]
    c.disk = [checkpoint(backbone, stored="float32")]
    largest = max((r for r in c.gpu if r.phase), key=lambda r: r.gigabytes)
    c.notes.append(f"each phase counted on the meta device (float32, fused attention; the backward's transient "
                   f"gradients not counted); the largest is {largest.phase}. optimize_chunk and encode_batch set only "
                   "memory: C1's gradient is the same taken in chunks of prompts, and the VAE encodes each image "
                   "independently of the others in its batch")
    return c


def _mllmtrace(p) -> Card:
    on_gpu = p["device"] == "auto"
    c = Card("06_mllm_tracing", "GPU when present (device auto), one device; bfloat16 there, float32 on the CPU"
             if on_gpu else p["device"])
    name = p["language_model"]
    dtype = "bfloat16" if on_gpu else "float32"
    config = architectures.architecture(name).config
    text, vision = _text(config), config["vision_config"]
    layers, width, heads = num_layers(name), text["hidden_size"], text["num_attention_heads"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2  # one visual token per patch
    batch, length = p["forward_batch"], patches + 24  # the flag and a short question
    # the phases do not overlap: the peak is what is held throughout plus the largest of them
    c.gpu = [weights(name, dtype),
             _during(activations(f"an edit's backward pass, {batch} prompts of ~{length} tokens", layers, width, heads,
                                 length, batch, dtype), "editing"),
             _during(kv_cache(name, length, batch, dtype), "tracing"),
             Row(f"a trace's clean states, {batch} prompts", f"{layers} layers × {batch} × {length} × {width} × "
                 f"{BYTES[dtype]} B", layers * batch * length * width * BYTES[dtype] / GB, phase="tracing"),
             Row(f"an ablation's attention maps, {batch} prompts", f"{layers} layers × {batch} × {heads} × {length}² × "
                 f"{BYTES[dtype]} B", layers * batch * heads * length * length * BYTES[dtype] / GB, phase="ablating")]
    # ROME's key covariance C of each edited layer's MLP output projection (d_ff × d_ff),
    # kept in float32 from its estimate to the end; while they are estimated
    # (mllmtrace.text_key_covariances) every edited layer's sum is held in float64 and the
    # last one's ridge is added through three more float64 matrices
    # (s / count, ridge·mean·I, their sum) and its float32 copy
    c.gpu += key_covariances(text["intermediate_size"], len(set(p["edit_layers"])))
    # the vision side's features of every view wait on the host in float32 (mllmtrace.load_flags),
    # each visual token already in the language model's width (LLaVA's projector)
    views = (p["train_views"] + p["test_views"]) * p["n_countries"]
    c.host = [Row("visual tokens of every flag view (float32)", f"{views:,} views × {patches} × {width} × 4 B",
                  views * patches * width * 4 / GB), mapped_while_loading([name])]
    c.disk = [checkpoint(name)]
    c.notes.append(f"~{length} tokens a prompt: {patches} image patches at {vision['image_size']} px and the question; "
                   f"{batch} prompts a pass (forward_batch)")
    return c


def key_covariances(d_ff: int, edited: int) -> list[Row]:
    """Chapter 06's ROME covariances (see :func:`_mllmtrace`): kept, and while estimated."""
    return [Row(f"key covariances of the {edited} edited layers (float32)", f"{edited} × {d_ff}² × 4 B",
                edited * d_ff * d_ff * 4 / GB),
            Row("estimating them: float64 sums and the ridge", f"({edited} × 8 + 3 × 8) × {d_ff}² B",
                (edited * 8 + 24) * d_ff * d_ff / GB, phase="covariance")]


# Chapter 07's library parts, which no formula covers: measured on the CPU with the
# chapter's own objects (tests/test_resources.py). galois compiles the BCH code's field
# arithmetic with numba once; ONNX Runtime keeps the memory arena of RivaGAN's encoder
# session after marking a batch (watermark_all's, at 256 px), so both stay held.
DREW_GALOIS_GB = 0.23
DREW_RIVAGAN_BATCH_GB, DREW_RIVAGAN_SIZE = 1.02, 256
# a ViT's forward pass holds, beside the hidden states, the MLP's first projection and its
# activation's temporaries: one more for a fused GELU, two for CLIP's quick_gelu
# (x·sigmoid(1.702·x)); attention is sdpa's, which keeps no token × token matrix
_MLP_TEMPORARIES = {"gelu": 2, "quick_gelu": 3}


def _embedding_pass(name: str, batch: int) -> Row:
    """One batch through ``name``'s image tower, inference: the batch's token states (the
    input, the residual stream, the attention's output, the normalised copy: 4 × width) and
    the MLP's intermediates (:data:`_MLP_TEMPORARIES` × its width), in float32. The tokens
    are the processor's crop (``Architecture.processor``, else the configuration's image size)
    in patches, + CLS."""
    arch = architectures.architecture(name)
    config = architectures.config_of(name, 1)  # transformers' config: the defaults the registry leaves out
    vision = getattr(config, "vision_config", config)
    crop = arch.processor[1] if arch.processor else vision.image_size
    tokens = (crop // vision.patch_size) ** 2 + 1
    width = vision.hidden_size
    mlp = getattr(vision, "intermediate_size", None) or vision.mlp_ratio * width  # DINOv2 gives a ratio
    kept = _MLP_TEMPORARIES[vision.hidden_act]
    return Row(f"{arch.hub_id} forward pass, batch {batch}", f"{batch} × {tokens} tokens × ({kept} × {mlp} + 4 × "
               f"{width}) × 4 B", batch * tokens * (kept * mlp + 4 * width) * 4 / GB,
               phase=f"embedding with {arch.hub_id}")  # one embedder after the other


def _drew(p) -> Card:
    import inspect

    from . import drew

    c = Card("07_drew", "CUDA when present (device='auto')")
    names = {"dinov2-base": "facebook/dinov2-base", "clip-vit-l-14": "openai/clip-vit-large-patch14"}
    embedders = [names[e] for e in p["embedders"] if e in names]
    batch = inspect.signature(drew.Embedder).parameters["batch_size"].default
    c.gpu = [weights(n, "float32") for n in embedders] + [_embedding_pass(n, batch) for n in embedders]
    n, size = p["n_reference"], p["image_size"]
    c.host = [mapped_while_loading(embedders),
              Row(f"reference images and a marked copy per watermark (uint8, {size} px)",
                  f"(1 + {len(p['watermarks'])}) × {n:,} × {size}² × 3 B", (1 + len(p["watermarks"])) * n * size**2 * 3 / GB),
              Row(f"galois's compiled BCH code ({p['ecc']})", f"{DREW_GALOIS_GB} GB, measured (numba's compiled field "
                  "arithmetic)", DREW_GALOIS_GB)]
    for mark in p["watermarks"]:
        if mark == "rivagan":
            c.host.append(Row("RivaGAN's encoder (ONNX Runtime), its arena after a batch",
                              f"{DREW_RIVAGAN_BATCH_GB} GB, measured at {DREW_RIVAGAN_SIZE} px", DREW_RIVAGAN_BATCH_GB))
        elif mark == "trustmark":
            c.gpu.append(Row("TrustMark's encoder and decoder over a batch", "not estimated", None))
    c.disk = [checkpoint(names[e]) for e in p["embedders"] if e in names]
    c.notes.append(f"{p['n_reference']} reference and {p['n_queries']} × {len(p['edits'])} query images embedded once; "
                   "CLIP's whole checkpoint is counted, though the chapter keeps its image tower")
    return c


def _loki(p) -> Card:
    c = Card("08_loki", "CUDA when present (device='auto')")
    names = p["model_names"]
    biggest = max(names, key=params)
    longest = max(p["contexts"])
    # the chapter loads every model before it measures any (language_models, its setup
    # section), so they are all held at once
    c.gpu = [*(weights(n, "bfloat16") for n in names), _during(kv_cache(biggest, longest, 1, "bfloat16"), "timing")]
    c.host = [mapped_while_loading(names)]
    c.disk = [checkpoint(n) for n in names]
    tokens = p["window"] * (p["calibration_windows"] + p["evaluation_windows"])
    c.flops = sum(2 * params(n) * tokens for n in names)
    c.notes.append(f"every model loaded at once; the KV row is the timing sweep's longest context ({longest} tokens) "
                   "on the largest; the time counts the perplexity windows only, not the timing sweep's repeats")
    return c


def _vitdecomp(p) -> Card:
    c = Card("09_vit_decompose", "CUDA when present (device='auto')" if p["device"] == "auto" else p["device"])
    names = [n for n in p["architectures"] if n in architectures.ARCHITECTURES]
    clip = "timm/vit_base_patch16_clip_224.openai"
    batch = p["decompose_batch"]
    images = p["n_train"] + 2 * p["n_test"]  # every test photo is shown on both backgrounds
    # every ViT stays on the device to the end (the ablations run its classifier); CLIP
    # joins them there after every ViT is decomposed (the chapter loads it later) to embed
    # the images, a batch at a time (cliplike.OpenClip): its weights are held while it loads
    # (beside its mapped checkpoint) and from then on, never while a ViT is decomposed
    embedding = _embedding_pass(clip, _clip_batch())
    c.gpu = [*(weights(n, "float32") for n in names), _during(weights(clip, "float32"), "loading"),
             _during(weights(clip, "float32"), embedding.phase), embedding]
    # the host keeps what decompose hands back: every ViT's decompositions, to the end
    c.host = []
    kept = {n: images * _vit_shape(n)["components"] * _vit_shape(n)["reads"] for n in names}
    c.host.append(Row("decompositions kept, every ViT (float32)",
                      " + ".join(f"{images} × {_vit_shape(n)['components']} × {_vit_shape(n)['reads']}" for n in names)
                      + " × 4 B", sum(kept.values()) * 4 / GB))
    if names:  # the largest ViT's decomposition (phase "decomposing"): its pixels on the host, one batch on the device
        inputs = {n: images * 3 * _vit_shape(n)["image_size"] ** 2 for n in names}
        widest = max(names, key=lambda n: inputs[n] + _repdecompose_bytes(n, batch, p["n_train"]))
        size, shown = _vit_shape(widest)["image_size"], min(batch, p["n_train"])
        c.gpu += [Row(f"{widest}: pixels of one batch (float32)", f"{shown} × 3 × {size}² × 4 B",
                      shown * 3 * size ** 2 * 4 / GB, phase="decomposing"),
                  Row(f"{widest}: RepDecompose of one batch (float32)",
                      _repdecompose_formula(widest, batch, p["n_train"]),
                      _repdecompose_bytes(widest, batch, p["n_train"]) / GB, phase="decomposing")]
        c.host.append(Row(f"{widest}: pixels of the training and test images (float32)",
                          f"{images} × 3 × {size}² × 4 B", inputs[widest] * 4 / GB, phase="decomposing"))
    c.host.append(mapped_while_loading([*names, clip]))
    c.disk = [checkpoint(n) for n in [*names, clip]]
    c.notes.append(f"the ViTs and CLIP on the device, the ViTs decomposed {batch} images at a time (decompose_batch, "
                   "memory only: RepDecompose holds every head's output over every token of a batch); their "
                   "decompositions, the probes and the CLIP alignment on the host")
    return c


def _clip_batch() -> int:
    """cliplike.OpenClip.image_features's images per batch (its default: chapter 09 passes none)."""
    import inspect

    from .cliplike import OpenClip

    return inspect.signature(OpenClip.image_features).parameters["batch"].default


def _vit_shape(name: str) -> dict:
    """What sizes a ViT's RepDecompose: tokens at the size the chapter feeds it (its
    config's ``image_size``: vitdecomp.model_inputs), layers as served, heads, width."""
    arch = architectures.architecture(name)
    c = arch.config
    layers, heads, width = num_layers(name), c["num_attention_heads"], c["hidden_size"]
    return {"image_size": c["image_size"], "tokens": (c["image_size"] // c["patch_size"]) ** 2 + 1, "layers": layers,
            "heads": heads, "width": width, "components": 1 + layers * (heads + 1),
            # DINOv2 reads the class token and the patches' mean; the others the class token
            "reads": 2 * width if arch.family == "dinov2" else width,
            "layer_scale": 1 if arch.family == "dinov2" else 0}


def _repdecompose_tensors(name: str) -> int:
    """Tensors of (batch, tokens, width) alive at once in one batch of RepDecompose
    (vitdecomp._decompose_batch), counted from its code: per layer, the captured context and
    MLP output and every head's output (one more with LayerScale, whose product is a new
    tensor); then the copy the last layer's head outputs make when their bias is added,
    the captured embeddings and final stream. Measured on dry-run ViTs at 1, 2 and 4 layers
    (DeiT and DINOv2, 197 and 1,370 tokens): within 3% (``tests/test_resources.py``)."""
    v = _vit_shape(name)
    return v["layers"] * (v["heads"] + 2 + v["layer_scale"]) + v["heads"] + 2


def _repdecompose_bytes(name: str, batch: int, images: int) -> float:
    """One batch of RepDecompose: ``batch`` images, or all ``images`` when there are fewer."""
    v = _vit_shape(name)
    return _repdecompose_tensors(name) * min(batch, images) * v["tokens"] * v["width"] * 4


def _repdecompose_formula(name: str, batch: int, images: int) -> str:
    v = _vit_shape(name)
    return (f"({v['layers']}·({v['heads']} + 2 + {v['layer_scale']}) + {v['heads']} + 2) × "
            f"{min(batch, images)} × {v['tokens']} × {v['width']} × 4 B")


# No formula covers a detector's pass: measured (tests/test_resources.py), torchvision's
# Mask R-CNN v2, untrained, one image as chapter 10 segments them, on the CPU. It hardly
# depends on the proposals kept (0.36 GB at 250, 0.38 at 1000) or the size (0.43 at 448 px):
# most of it is the convolutions' working memory, not the detections.
MASKRCNN_PASS_GB, MASKRCNN_PASS_SIZE = 0.38, 224


def _semtokens(p) -> Card:
    c = Card("10_semantic_tokens", "CUDA when present (device='auto')" if p["device"] == "auto" else p["device"])
    width, depth, heads, size = p["width"], p["depth"], p["heads"], p["image_size"]
    tokens = (size // p["patch"]) ** 2 + 1
    images = p["n_train"] + p["n_val"] + p["n_test"]
    import inspect
    from types import SimpleNamespace

    import torch

    from . import semtokens

    # one image encoder trains at a time: the largest of the variants this run compares,
    # counted from the module itself (built on the meta device: its blocks, the patch or token
    # embedding, positions and the projection head)
    with torch.device("meta"):
        counted = {v: sum(t.numel() for t in semtokens.build_encoder(v, SimpleNamespace(**p)).parameters())
                   for v in semtokens.variants_for(SimpleNamespace(**p))}
    largest_variant = max(counted, key=counted.get)
    encoder = counted[largest_variant]
    from .semtokens import CROP, GEOMETRY, RELATION_FEATURES
    # what semtokens.prepare keeps for the whole run, for every image of every split: the
    # images, the segmenter's instance maps (int64), every variant's inputs (the patch
    # ViT's pixels; the semantic variants each build their own tokens: at most 4 instances,
    # their 4-channel crops and geometry, and 6 relations) and the captions' MiniLM states
    # (float16, 24 tokens) with one swapped caption per kind of negative
    semantic_variants = len([v for v in semtokens.variants_for(SimpleNamespace(data=p["data"])) if v != "patch ViT"])
    instances = inspect.signature(semtokens.build_tokens).parameters["max_instances"].default
    relations = instances * (instances - 1) // 2
    per_tokens = instances * (4 * CROP * CROP + GEOMETRY) * 4 + relations * RELATION_FEATURES * 4
    text = architectures.architecture(p["text_model"]).config["hidden_size"]
    length = inspect.signature(semtokens.text_states).parameters["length"].default
    captions = 1 + len(p["negatives"])
    # the host keeps every split (semtokens.prepare); MiniLM encodes the captions there
    c.host = [Row(f"images, {images:,} at {size} px (uint8)", f"{images:,} × {size}² × 3 B", images * size * size * 3 / GB),
             Row("instance maps of the segmenter (int64)", f"{images:,} × {size}² × 8 B", images * size * size * 8 / GB),
             Row("patch ViT's pixels (float32)", f"{images:,} × 3 × {size}² × 4 B", images * 3 * size * size * 4 / GB),
             Row(f"semantic tokens, {semantic_variants} variants (float32)",
                 f"{semantic_variants} × {images:,} × ({instances} × (4·{CROP}² + {GEOMETRY}) + {relations} × "
                 f"{RELATION_FEATURES}) × 4 B",
                 semantic_variants * images * per_tokens / GB),
             Row("captions' MiniLM states (float16)", f"{images:,} × {captions} × {length} × {text} × 2 B",
                 images * captions * length * text * 2 / GB),
             # segmenting and encoding the captions come first (phase "preparing"), training after
             _during(weights(p["text_model"], "float32"), "preparing"),
             mapped_while_loading([p["text_model"]])]
    # the device: Mask R-CNN while segmenting, then one encoder training on one batch at a time
    c.gpu = []
    if p["segmenter"] != "threshold":
        from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights

        maskrcnn = MaskRCNN_ResNet50_FPN_V2_Weights.DEFAULT.meta["num_params"]
        c.gpu += [Row("Mask R-CNN segmenter (float32)", f"{maskrcnn / 1e9:.3f} B params × 4 B (torchvision's count)",
                      maskrcnn * 4 / GB, phase="preparing"),
                  Row("Mask R-CNN's pass over one image (its proposals, box and mask heads)",
                      f"{MASKRCNN_PASS_GB} GB, measured at {MASKRCNN_PASS_SIZE} px on the CPU (no formula covers a "
                      "detector)", MASKRCNN_PASS_GB, phase="preparing")]
    kept = checkpointed_activations if p["checkpoint_blocks"] else activations
    c.gpu += [_during(Row(f"image ViT ({depth} × {width}, the {largest_variant} encoder), float32",
                          f"{encoder / 1e9:.3f} B params × 4 B (semtokens.build_encoder)", encoder * 4 / GB), "training"),
              _during(adamw_state("image ViT", encoder, "float32"), "training"),
              _during(kept(f"image ViT, batch {p['batch']}", depth, width, heads, tokens, p["batch"], "float32"),
                      "training"),
              _during(Row("patch ViT's pixels of one batch (float32)", f"{p['batch']} × 3 × {size}² × 4 B",
                          p["batch"] * 3 * size * size * 4 / GB), "training")]
    # the learned text head trains beside it: counted from the module itself (built on the
    # meta device), its layers over a batch of captions and one swapped caption per negative kind
    with torch.device("meta"):
        head = semtokens.TextProjection(text, p["embed_dim"], p["text_queries"], p["text_layers"], width)
    trained = sum(t.numel() for t in head.parameters())
    texts = p["batch"] * captions
    c.gpu += [_during(Row(f"text head ({p['text_layers']} × {width} over MiniLM's states), float32",
                          f"{trained / 1e9:.3f} B params × 4 B (semtokens.TextProjection)", trained * 4 / GB), "training"),
              _during(adamw_state("text head", trained, "float32"), "training")]
    if p["text_layers"]:
        c.gpu.append(_during(activations(f"text head, {texts} captions", p["text_layers"], width,
                                         inspect.signature(semtokens.TextProjection).parameters["heads"].default,
                                         length, texts, "float32"), "training"))
    c.disk = [checkpoint(p["text_model"]), Row("COCO 2017 train + val images and annotations", "the dataset's size",
                                               None)]
    c.flops = 6 * encoder * tokens * p["n_train"] * p["max_epochs"]
    c.notes.append(f"trains a ViT-B-sized encoder from scratch at batch {p['batch']} in float32"
                   + (", each transformer block recomputing its activations in the backward pass (checkpoint_blocks: "
                      "without it they alone exceed one H200)" if p["checkpoint_blocks"] else "")
                   + "; every split's images, masks and inputs stay in host memory (semtokens.prepare), a batch at a "
                   "time goes to the device; MiniLM encodes the captions on the host")
    return c


CARDS = {"00_model_zoo": _zoo, "01_restor": _restor, "02_skill_slices": _skillslices, "03_intcoop": _intcoop,
         "04_endor": _endor, "05_t2i_composition": _t2icomp, "06_mllm_tracing": _mllmtrace, "07_drew": _drew,
         "08_loki": _loki, "09_vit_decompose": _vitdecomp, "10_semantic_tokens": _semtokens}


# ----------------------------------------------------------------------------- the table


def _gb(value: float | None, partial: bool = False) -> str:
    if value is None:
        return "not estimated"
    return f"≥ {value:,.1f}" if partial else f"{value:,.1f}"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2g} s"
    if seconds < 3600:
        return f"{seconds / 60:.2g} min"
    return f"{seconds / 3600:.2g} h"


def table() -> str:
    """The how-to-run page's table: one row per chapter."""
    lines = ["| chapter | runs on (paper preset today) | device memory, GB | host memory beyond it, GB | disk, GB | "
             "time at H100 peak | notes |", "|---|---|---|---|---|---|---|"]
    for slug in CARDS:
        c = card(slug)
        partial_gpu = any(r.gigabytes is None for r in c.gpu)
        hours = "—" if c.hours_at_peak is None else f"≥ {_duration(c.hours_at_peak * 3600)}"
        lines.append(f"| {slug} | {c.device} | {_gb(c.peak_gb, partial_gpu)} | {_gb(c.host_gb) if c.host else '—'} | "
                     f"{_gb(c.disk_gb, any(r.gigabytes is None for r in c.disk))} | {hours} | {'; '.join(c.notes)} |")
    return "\n".join(lines)


def describe(slug: str) -> str:
    """One card in full, every row with its formula."""
    c = card(slug)
    out = [f"{slug} — paper preset, runs on: {c.device}"]
    for title, rows in (("device memory", c.gpu), ("host memory", c.host), ("disk", c.disk)):
        for r in rows:
            during = f" (while {r.phase})" if r.phase else ""
            out.append(f"  {title:13} {_gb(r.gigabytes):>14}  {r.what}{during}  [{r.formula}]")
        phases = {r.phase for r in rows if r.phase and r.gigabytes is not None}
        if phases:  # rows of different phases are not held at once: the peak adds the largest phase
            largest = max(phases, key=lambda ph: sum(r.gigabytes for r in rows if r.phase == ph and r.gigabytes))
            out.append(f"  {title:13} {_gb(peak_of(rows)):>14}  at its peak: what is held throughout, and "
                       f"the largest phase ({largest})")
    if c.hours_at_peak is not None:
        out.append(f"  {'time':13} ≥ {_duration(c.hours_at_peak * 3600)} at {H100_BF16_FLOPS / 1e12:.0f} TFLOP/s")
    out += [f"  note: {n}" for n in c.notes]
    return "\n".join(out)


# ----------------------------------------------------------------------------- cards against dry runs

# issue #29: a card's memory must come within this share of what a dry run of the same
# workload measured (its peak beyond the libraries' own memory, see library_baseline_bytes)
CARD_TOLERANCE = 0.25
# what every chapter's kernel has imported before its first model loads
# (transformers.modeling_utils is imported by the first model a chapter loads through
# transformers or sentence-transformers; open_clip, which chapter 03 loads through instead,
# costs about as much: ``tests/test_resources.py``)
BASELINE_IMPORTS = ("ipykernel", "torch", "transformers", "transformers.modeling_utils", "matplotlib.pyplot", "numpy",
                    "replbook.models")


def library_baseline_bytes() -> int:
    """Peak resident memory of a fresh interpreter that has imported :data:`BASELINE_IMPORTS`
    and loaded nothing: the part of a dry run's peak that no card row describes. Libraries a
    chapter imports beyond these (diffusers, open_clip, scikit-learn, faiss) stay in what its
    card must explain, which can only make a card look too small."""
    import subprocess
    import sys

    # VmHWM, as the dry run measures its kernel (dryrun.high_water_bytes): ru_maxrss would
    # count the memory of the process this one is started from
    code = (f"import os, {', '.join(BASELINE_IMPORTS)}; from replbook.dryrun import high_water_bytes; "
            "print(high_water_bytes(os.getpid()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@dataclass
class AgainstDryRun:
    chapter: str
    layers: int
    card_gb: float  # device + host rows the card estimates, for the dry run's workload
    partial: bool  # the card leaves a row it cannot estimate out of card_gb
    measured_gb: float  # the dry run's peak resident memory less the libraries' baseline

    @property
    def ratio(self) -> float:
        return self.card_gb / self.measured_gb

    @property
    def within(self) -> bool:
        return abs(self.card_gb - self.measured_gb) <= CARD_TOLERANCE * self.measured_gb


def against_dry_run(entry: dict, baseline_bytes: int) -> AgainstDryRun:
    """The card of the workload a recorded CPU dry run ran (``entry`` of
    ``kernels/measurements/paper_dryrun_cpu.json``: its parameters, its depth) set beside
    the memory that run measured. On the CPU the host holds what a GPU would, so both parts
    of the card count, and a preset's ``device`` is the CPU (chapter 06 loads float32
    there, bfloat16 on a GPU)."""
    if "kernel_peak_bytes" not in entry:
        raise ValueError(f"{entry['chapter']}|layers-{entry['layers']}: its peak_rss_bytes counts the launching "
                         "process's memory too (recorded before kernel_peak_bytes): rerun `replbook dryrun`")
    slug, layers = entry["chapter"], entry["layers"]
    ran = {k: v for k, v in entry["overrides"].items() if k not in ("preset", "threads")}
    if "device" in _preset(slug):
        ran.setdefault("device", "cpu")
    c = card(slug, ran, layers)
    held = [r for r in c.gpu + c.host if r.beside_weights_on_cpu]  # a file read in its own precision is the weights
    return AgainstDryRun(slug, layers, peak_of(held) or 0.0, any(r.gigabytes is None for r in held),
                         (entry["kernel_peak_bytes"] - baseline_bytes) / GB)


def against_dry_runs_table(path=None) -> str:
    """Every recorded CPU dry run's card beside its measured memory (the libraries' baseline
    measured here, now), or why a record cannot be compared."""
    import json

    from .paths import repo_root

    path = path or repo_root() / "kernels" / "measurements" / "paper_dryrun_cpu.json"
    baseline = library_baseline_bytes()
    lines = [f"libraries' baseline (a fresh interpreter with {', '.join(BASELINE_IMPORTS)}): {baseline / GB:.2f} GB",
             f"{'dry run':28} {'card, GB':>9} {'measured, GB':>13} {'ratio':>6}  within {CARD_TOLERANCE:.0%}"]
    for key, entry in json.loads(Path(path).read_text()).items():
        try:
            got = against_dry_run(entry, baseline)
        except ValueError as err:
            lines.append(f"{key:28} {str(err).split(': ', 1)[1]}")
            continue
        card_gb = f"{'≥ ' if got.partial else ''}{got.card_gb:.2f}"
        lines.append(f"{key:28} {card_gb:>9} {got.measured_gb:13.2f} {got.ratio:6.2f}  {'yes' if got.within else 'no'}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- spreading a model


def device_plan(name: str, gpus: int, gpu_gb: float, dtype: str | None = None, cpu_gb: float = 0.0,
                reserve_gb: float = 2.0) -> dict[str, float]:
    """How Accelerate's ``device_map="auto"`` would spread ``name`` (at ``dtype``, default
    the paper's) over ``gpus`` GPUs of ``gpu_gb`` each, keeping ``reserve_gb`` per GPU free
    for activations and the KV cache, then over ``cpu_gb`` of host memory, then disk: the
    gigabytes of weights on each device. Planned on the meta device (no memory, no GPU),
    with the ``max_memory`` a reader would pass to ``from_pretrained``."""
    import logging

    import torch
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    if gpus < 0 or gpu_gb <= reserve_gb:
        raise ValueError(f"gpus={gpus}, gpu_gb={gpu_gb}: need gpus ≥ 0 and gpu_gb > reserve_gb={reserve_gb}")
    dtype = dtype or architectures.architecture(name).dtype
    model = architectures.build(name, device="meta")
    budget = {i: (gpu_gb - reserve_gb) * GB for i in range(gpus)}
    budget["cpu"] = cpu_gb * GB
    quiet = logging.getLogger("accelerate.utils.modeling")
    level, quiet.level = quiet.level, logging.ERROR  # it warns that the planned GPUs are absent here
    try:
        plan = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=model._no_split_modules,
                                     dtype=getattr(torch, dtype))
    finally:
        quiet.setLevel(level)
    sizes = compute_module_sizes(model, dtype=getattr(torch, dtype))
    placed: dict[str, float] = {}
    for module, device in plan.items():
        key = f"cuda:{device}" if isinstance(device, int) else str(device)
        placed[key] = placed.get(key, 0.0) + sizes[module] / GB
    return placed


BEGIN, END = "<!-- resource cards: begin (replbook.resources.table) -->", "<!-- resource cards: end -->"


def update_page(path) -> bool:
    """Write the table between the markers of ``path``; True when it changed."""
    from pathlib import Path

    path = Path(path)
    text = path.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    new = f"{head}{BEGIN}\n{table()}\n{END}{tail}"
    if new != text:
        path.write_text(new)
    return new != text
