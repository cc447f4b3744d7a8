"""Decomposing a ViT's representation and reading it through text (Balasubramanian,
Basu, Feizi, NeurIPS 2024, arXiv 2406.01583; official code github.com/SriramB-98/vit-decompose).

Three steps, as in the paper:

- **RepDecompose** (:func:`decompose`): the representation a ViT's classifier reads is
  a sum of *direct contributions* of its components — the embeddings, every attention
  head, every MLP — because the residual stream is a sum and everything after it is
  linear once the final LayerNorm is linearised per sample (its scale 1/σ frozen at the
  sample's value, its bias split evenly over the components). Supported: transformers'
  ``ViTForImageClassification`` (and DeiT-style checkpoints saved as ViT) and
  ``Dinov2ForImageClassification`` (LayerScale, SwiGLU, CLS + mean-patch readout).
- **CompAlign** (:class:`CompAlign`): one linear map per component into a CLIP space,
  trained so that the mapped contributions sum to the image's CLIP embedding
  (1 − cos, plus an orthogonality regulariser on each map).
- **CompAttribute** (:func:`component_scores`): for a feature described by texts B
  (orthonormalised), the correlation over images between the projection of the whole
  mapped representation and of component i onto each direction of B, averaged over
  the directions.

Applications measured in chapter 09: retrieval with a feature's top components, and
mean-ablating the components tied to a spurious feature (:func:`ablated_logits`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .images import IMAGENET_MEAN, IMAGENET_STD, to_tensor

# ----------------------------------------------------------------------------- RepDecompose


def _parts(model):
    """The pieces RepDecompose walks, for each supported architecture family."""
    if hasattr(model, "vit"):
        backbone = model.vit
        layers = list(backbone.layers)
        return backbone, layers, [None] * len(layers), [None] * len(layers), "cls"
    if hasattr(model, "dinov2"):
        backbone = model.dinov2
        layers = list(backbone.encoder.layer)
        return (backbone, layers, [layer.layer_scale1 for layer in layers], [layer.layer_scale2 for layer in layers],
                "cls+mean")
    raise ValueError(f"{type(model).__name__}: RepDecompose supports ViTForImageClassification and "
                     f"Dinov2ForImageClassification")


def component_names(model) -> list[str]:
    """``embed``, then ``L{l}.H{h}`` for every head and ``L{l}.MLP`` for every layer."""
    _, layers, *_ = _parts(model)
    heads = model.config.num_attention_heads
    names = ["embed"]
    for l in range(len(layers)):
        names += [f"L{l}.H{h}" for h in range(heads)] + [f"L{l}.MLP"]
    return names


def _out_projection(layer) -> nn.Linear:
    """The attention's output projection (``o_proj``; ``output.dense`` in transformers < 5.20)."""
    attention = layer.attention
    return attention.o_proj if hasattr(attention, "o_proj") else attention.output.dense


@dataclass
class Decomposition:
    names: list[str]
    contributions: torch.Tensor  # (N, C, D): direct contribution of each component
    representation: torch.Tensor  # (N, D): what the model's classifier reads

    @property
    def max_abs_error(self) -> float:
        return float((self.contributions.sum(1) - self.representation).abs().max())


@torch.no_grad()
def _decompose_batch(model, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    backbone, layers, scale1, scale2, readout = _parts(model)
    heads = model.config.num_attention_heads
    captured: dict[str, torch.Tensor] = {}
    hooks = [backbone.embeddings.register_forward_hook(lambda m, i, o: captured.__setitem__("embed", o)),
             backbone.layernorm.register_forward_pre_hook(lambda m, i: captured.__setitem__("final", i[0]))]
    for l, layer in enumerate(layers):
        hooks.append(_out_projection(layer).register_forward_pre_hook(
            lambda m, i, l=l: captured.__setitem__(f"ctx{l}", i[0])))
        hooks.append(layer.mlp.register_forward_hook(lambda m, i, o, l=l: captured.__setitem__(f"mlp{l}", o)))
    try:
        model(pixel_values=pixel_values)
    finally:
        for hook in hooks:
            hook.remove()

    parts = [captured["embed"]]  # each (N, T, D): a direct write into the residual stream
    for l, layer in enumerate(layers):
        o_proj = _out_projection(layer)
        ctx = captured[f"ctx{l}"]
        n, t, width = ctx.shape
        per_head = ctx.view(n, t, heads, width // heads)
        weight = o_proj.weight.view(o_proj.out_features, heads, width // heads)  # (D, H, d_head)
        head_out = torch.einsum("nthd,ohd->hnto", per_head, weight)
        if o_proj.bias is not None:  # the output bias, split evenly over the heads
            head_out = head_out + o_proj.bias / heads
        mlp_out = captured[f"mlp{l}"]
        if scale1[l] is not None:  # LayerScale is a per-channel product: linear
            head_out, mlp_out = head_out * scale1[l].lambda1, mlp_out * scale2[l].lambda1
        parts += list(head_out) + [mlp_out]

    stream, ln = captured["final"], backbone.layernorm
    sequence = ln(stream)
    if readout == "cls":  # only the class token is read: normalise just that one
        stream, parts, sequence = stream[:, :1], [p[:, :1] for p in parts], sequence[:, :1]
    # the final LayerNorm, linearised: its 1/σ frozen per sample and token, its bias split evenly
    sigma = torch.sqrt(stream.var(-1, unbiased=False, keepdim=True) + ln.eps)

    def read(x):  # (N, T, D) -> what the classifier reads
        return x[:, 0] if readout == "cls" else torch.cat([x[:, 0], x[:, 1:].mean(1)], -1)

    normed = [read((p - p.mean(-1, keepdim=True)) * ln.weight / sigma + ln.bias / len(parts)) for p in parts]
    return torch.stack(normed, 1), read(sequence)


def decompose(model, pixel_values: torch.Tensor, batch: int = 256, progress: str | None = None) -> Decomposition:
    """Every component's direct contribution to the representation the classifier reads
    (paper §3, RepDecompose); ``contributions.sum(1)`` equals ``representation``.

    ``batch`` images go through the model at a time, on the model's device; what is kept
    comes back to the host. A batch holds every head's output over every token (at
    DINOv2-B's 1,370 tokens ~0.8 GB an image), so the batch sets the device memory
    (``decompose_batch``; the decomposition does not depend on it beyond float rounding)."""
    from tqdm.auto import tqdm

    model.eval()
    where = _device_of(model)
    contributions, representation = [], []
    for i in tqdm(range(0, len(pixel_values), batch), desc=progress, disable=progress is None):
        c, r = _decompose_batch(model, pixel_values[i:i + batch].to(where))
        contributions.append(c.cpu())
        representation.append(r.cpu())
    return Decomposition(component_names(model), torch.cat(contributions), torch.cat(representation))


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def ablated_logits(model, decomposition: Decomposition, ablate: list[int], means: torch.Tensor) -> torch.Tensor:
    """The classifier on the representation with components ``ablate`` replaced by their
    mean contribution ``means`` (C, D) (mean-ablation, paper §5.3); the sum is formed on
    the host, where the decompositions are kept, and only the classifier runs on the
    model's device."""
    rep = decomposition.representation.clone()
    for i in ablate:
        rep += means[i] - decomposition.contributions[:, i]
    return model.classifier(rep.to(_device_of(model))).cpu()


# ----------------------------------------------------------------------------- CompAlign


class CompAlign(nn.Module):
    """One linear map per component into the CLIP space (paper §4)."""

    def __init__(self, n_components: int, dim: int, clip_dim: int):
        super().__init__()
        self.maps = nn.Parameter(torch.randn(n_components, dim, clip_dim) / np.sqrt(dim))
        self.bias = nn.Parameter(torch.zeros(clip_dim))

    def mapped(self, contributions: torch.Tensor) -> torch.Tensor:  # (N, C, D) -> (N, C, clip_dim)
        return torch.einsum("ncd,cde->nce", contributions, self.maps)

    def forward(self, contributions: torch.Tensor) -> torch.Tensor:
        return self.mapped(contributions).sum(1) + self.bias

    def orthogonality(self) -> torch.Tensor:
        """Σ_i ‖Ŵ_iᵀŴ_i − I‖² with Ŵ_i scaled to unit mean column norm: keeps each map a
        rotation up to scale, so distances inside a component survive the mapping."""
        gram = torch.einsum("cde,cfe->cdf", self.maps, self.maps)
        scale = torch.diagonal(gram, dim1=1, dim2=2).mean(-1, keepdim=True).unsqueeze(-1)
        eye = torch.eye(gram.shape[-1])
        return ((gram / scale.clamp(min=1e-8) - eye) ** 2).sum((1, 2)).mean()


def fit_compalign(contributions: torch.Tensor, targets: torch.Tensor, steps: int, lr: float,
                  orthogonality_weight: float, seed: int, batch: int = 256, progress: str | None = None) -> CompAlign:
    """Fit the maps so that Σ_i W_i c_i + b ≈ the CLIP embedding: loss 1 − cos + λ·orth."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    align = CompAlign(contributions.shape[1], contributions.shape[2], targets.shape[1])
    optimizer = torch.optim.Adam(align.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in tqdm(range(steps), desc=progress, disable=progress is None):
        idx = torch.randint(0, len(contributions), (min(batch, len(contributions)),), generator=generator)
        predicted = align(contributions[idx])
        loss = (1 - nn.functional.cosine_similarity(predicted, targets[idx], dim=-1)).mean()
        loss = loss + orthogonality_weight * align.orthogonality()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return align.eval()


@torch.no_grad()
def alignment_cosine(align: CompAlign, contributions: torch.Tensor, targets: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(align(contributions), targets, dim=-1).mean())


# ----------------------------------------------------------------------------- CompAttribute


def orthonormal_basis(texts: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis (k, d) of the span of k text embeddings."""
    q, _ = torch.linalg.qr(texts.T)
    return q.T


@torch.no_grad()
def component_scores(mapped: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """CompAttribute (paper §4): for each component i, the correlation over images of
    ⟨Σ_j m_j(x), u⟩ and ⟨m_i(x), u⟩, averaged over the basis directions u. (C,)"""
    total = mapped.sum(1) @ basis.T  # (N, k)
    parts = torch.einsum("nce,ke->nck", mapped, basis)
    total = total - total.mean(0)
    parts = parts - parts.mean(0)
    corr = (parts * total[:, None]).sum(0) / (parts.norm(dim=0) * total.norm(dim=0)[None]).clamp(min=1e-12)
    return corr.mean(-1)


def top_components(scores: torch.Tensor, k: int) -> list[int]:
    return scores.topk(k).indices.tolist()


@torch.no_grad()
def retrieval_hits(embeddings: torch.Tensor, labels: np.ndarray, k: int = 5) -> np.ndarray:
    """Per query image, the share of its k nearest other images (cosine) that share its label."""
    x = nn.functional.normalize(embeddings, dim=-1)
    sims = x @ x.T
    sims.fill_diagonal_(-float("inf"))
    neighbours = sims.topk(k, dim=1).indices.numpy()
    return (labels[neighbours] == labels[:, None]).mean(1)


def retrieval_agreement(embeddings: torch.Tensor, labels: np.ndarray, k: int = 5) -> float:
    """How often an image's k nearest other images (cosine) share its label."""
    return float(retrieval_hits(embeddings, labels, k).mean())


def chance_agreement(labels: np.ndarray) -> float:
    """The agreement of k neighbours drawn at random from the other images: the chance that
    two distinct images share a label (0.5 for two balanced backgrounds, ~0.1 for ten classes)."""
    counts = np.unique(labels, return_counts=True)[1].astype(float)
    return float((counts * (counts - 1)).sum() / (len(labels) * (len(labels) - 1)))


def paired_interval(own: np.ndarray, other: np.ndarray, seed: int, level: float = 0.95,
                    resamples: int = 2000) -> tuple[float, float, float]:
    """Mean of ``own − other`` over the same queries and its percentile-bootstrap interval
    (queries resampled with replacement; scipy.stats.bootstrap). Neighbour lists overlap, so
    the queries are not quite independent: the interval is a little narrow, if anything."""
    from scipy import stats

    difference = np.asarray(own, dtype=float) - np.asarray(other, dtype=float)
    interval = stats.bootstrap((difference,), np.mean, n_resamples=resamples, confidence_level=level,
                               method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    return float(difference.mean()), float(interval.low), float(interval.high)


# ----------------------------------------------------------------------------- the official spurious-feature protocol

# The official zs_spur_correlation.py decomposes ViT-B's blocks 7-11 (of 12) by head and MLP and
# keeps everything written before block 7 as one component, ranks components by their score for
# the spurious feature's texts minus their score for the core feature's, and mean-ablates the top
# ten with their mean over the evaluation images themselves.
OFFICIAL_FIRST_BLOCK = (7, 12)


def official_first_layer(depth: int) -> int:
    """The first layer the official protocol decomposes by head and MLP, scaled to ``depth``
    layers (7 of 12: layer 2 of 4 here)."""
    first, of = OFFICIAL_FIRST_BLOCK
    return min(depth - 1, max(1, round(depth * first / of)))


def lump_early_layers(decomposition: Decomposition, first_layer: int) -> Decomposition:
    """The official granularity: the embeddings and every head and MLP of the layers before
    ``first_layer`` summed into one component, ``before L{first_layer}``; the later heads and
    MLPs as they are. The contributions still sum to the representation."""
    def layer(name: str) -> int:
        return -1 if name == "embed" else int(name[1:name.index(".")])

    early = [i for i, name in enumerate(decomposition.names) if layer(name) < first_layer]
    late = [i for i, name in enumerate(decomposition.names) if layer(name) >= first_layer]
    if not early or not late:
        raise ValueError(f"first_layer={first_layer}: must leave components before and after it "
                         f"(0..{max(layer(n) for n in decomposition.names)})")
    contributions = torch.cat([decomposition.contributions[:, early].sum(1, keepdim=True),
                               decomposition.contributions[:, late]], 1)
    return Decomposition([f"before L{first_layer}"] + [decomposition.names[i] for i in late], contributions,
                         decomposition.representation)


@torch.no_grad()
def spurious_minus_core(mapped: torch.Tensor, spurious_basis: torch.Tensor, core_basis: torch.Tensor) -> torch.Tensor:
    """The official ranking score: each component's CompAttribute score for the spurious
    feature minus its score for the core one (highest first is ablated). (C,)"""
    return component_scores(mapped, spurious_basis) - component_scores(mapped, core_basis)


# ----------------------------------------------------------------------------- a Waterbirds-like set

GROUP_NAMES = ("animal on land", "animal on water", "vehicle on land", "vehicle on water")
VEHICLES = ("airplane", "automobile", "ship", "truck")
BACKGROUNDS = ("land", "water")


def backgrounds(kind: str, n: int, size: int, seed: int) -> np.ndarray:
    """``n`` random ``size``-px background crops: "land" is scikit-image's grass texture
    tinted green-brown, "water" its gravel texture tinted blue with horizontal ripples."""
    import skimage.data

    rng = np.random.default_rng(seed)
    texture = (skimage.data.grass() if kind == "land" else skimage.data.gravel()).astype(np.float64) / 255
    out = np.empty((n, size, size, 3))
    for i in range(n):
        top, left = rng.integers(0, texture.shape[0] - 2 * size, 2)
        crop = texture[top:top + 2 * size:2, left:left + 2 * size:2]
        if kind == "land":
            tint = np.array([0.35, 0.55, 0.2]) + rng.uniform(-0.05, 0.05, 3)
            out[i] = crop[..., None] * tint * 1.6
        else:
            rows = np.arange(size)[:, None]
            ripple = 0.5 + 0.5 * np.sin(rows * rng.uniform(0.6, 1.2) + rng.uniform(0, 2 * np.pi))
            tint = np.array([0.15, 0.35, 0.75]) + rng.uniform(-0.05, 0.05, 3)
            out[i] = (0.6 * crop + 0.4 * ripple)[..., None] * tint * 1.5
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def composite(objects: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Paste each (32 px) object photo in the centre of its (larger) background."""
    out = background.copy()
    offset = (background.shape[1] - objects.shape[1]) // 2
    out[:, offset:offset + objects.shape[1], offset:offset + objects.shape[2]] = objects
    return out


@dataclass
class SpuriousSet:
    """Images with a label (animal 0 / vehicle 1), a background (land 0 / water 1), the
    CIFAR-10 class and the measured colour of the object."""

    images: np.ndarray
    labels: np.ndarray
    backgrounds: np.ndarray
    classes: np.ndarray
    colours: np.ndarray

    @property
    def groups(self) -> np.ndarray:
        return 2 * self.labels + self.backgrounds


def waterbirds_like(n_train: int, n_test: int, agreement: float, size: int, seed: int
                    ) -> tuple[SpuriousSet, SpuriousSet, SpuriousSet]:
    """CIFAR-10 photos as objects (label: vehicle or animal) on land or water backgrounds.

    - ``pretrain``: the training photos on backgrounds drawn independently of the label
      (what the ViTs are pre-trained on, with the 10 CIFAR classes as labels);
    - ``train``: the same photos with the background agreeing with the label
      (vehicle–water, animal–land) for a share ``agreement``, as Waterbirds' 95%
      (what the linear probe is fitted on);
    - ``test``: held-out photos, each shown on both backgrounds (balanced groups)."""
    from . import data
    from .cliplike import dominant_colour

    images, classes = data.cifar10_test()
    order = np.random.default_rng(seed).permutation(len(images))[:n_train + n_test]
    images, classes = images[order], classes[order]
    vehicle = np.array([data.CIFAR10_CLASSES[c] in VEHICLES for c in classes], dtype=np.int64)
    colours = dominant_colour(images)
    rng = np.random.default_rng(seed + 1)
    random_bg = rng.integers(0, 2, n_train)
    train_bg = np.where(rng.random(n_train) < agreement, vehicle[:n_train], 1 - vehicle[:n_train])

    def render(objects, bgs, salt):
        out = np.empty((len(objects), size, size, 3), np.uint8)
        for kind in (0, 1):
            where = np.flatnonzero(bgs == kind)
            out[where] = composite(objects[where], backgrounds(BACKGROUNDS[kind], len(where), size, seed + salt + kind))
        return out

    head = slice(0, n_train)
    pretrain = SpuriousSet(render(images[head], random_bg, 30), vehicle[head], random_bg, classes[head], colours[head])
    train = SpuriousSet(render(images[head], train_bg, 10), vehicle[head], train_bg, classes[head], colours[head])
    test_objects = np.concatenate([images[n_train:], images[n_train:]])
    test_bg = np.repeat([0, 1], n_test)
    test = SpuriousSet(render(test_objects, test_bg, 20), np.tile(vehicle[n_train:], 2), test_bg,
                       np.tile(classes[n_train:], 2), np.tile(colours[n_train:], 2))
    return pretrain, train, test


def group_accuracies(predicted: np.ndarray, dataset: SpuriousSet) -> dict[str, float]:
    """Accuracy per group, the worst group's and the average over images."""
    correct = predicted == dataset.labels
    out = {name: float(correct[dataset.groups == g].mean()) for g, name in enumerate(GROUP_NAMES)}
    out["worst group"] = min(out[name] for name in GROUP_NAMES)
    out["average"] = float(correct.mean())
    return out


# ----------------------------------------------------------------------------- the ViTs

ARCHITECTURES = ("vit", "dinov2")


def build_model(architecture: str, image_size: int, width: int, depth: int, heads: int, seed: int,
                num_labels: int = 10):
    """A small randomly initialised classifier of one of two transformers families:
    ``vit`` (pre-LN ViT, CLS readout) or ``dinov2`` (LayerScale, SwiGLU MLP, CLS +
    mean-patch readout); both with 8-px patches."""
    from transformers import Dinov2Config, Dinov2ForImageClassification, ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    common = dict(hidden_size=width, num_hidden_layers=depth, num_attention_heads=heads, image_size=image_size,
                  patch_size=8, num_labels=num_labels)
    if architecture == "vit":
        return ViTForImageClassification(ViTConfig(intermediate_size=2 * width, **common))
    if architecture == "dinov2":
        return Dinov2ForImageClassification(Dinov2Config(mlp_ratio=2, use_swiglu_ffn=True, **common))
    raise ValueError(f"architecture {architecture!r}; choose one of: {', '.join(ARCHITECTURES)}")


def train_classifier(model, inputs: torch.Tensor, labels: np.ndarray, epochs: int, lr: float, batch: int, seed: int,
                     only_head: bool = False, progress: str | None = None) -> list[float]:
    """AdamW with a cosine schedule and horizontal flips; ``only_head`` trains the linear
    classifier alone (a linear probe on a frozen pretrained backbone)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    params = list(model.classifier.parameters()) if only_head else list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    steps = epochs * int(np.ceil(len(inputs) / batch))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    targets = torch.as_tensor(labels, device=inputs.device)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    bar = tqdm(total=steps, desc=progress, disable=progress is None)
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for i in range(0, len(inputs), batch):
            idx = order[i:i + batch].to(inputs.device)
            x = inputs[idx]
            flip = (torch.rand(len(idx), generator=generator) < 0.5).to(inputs.device)
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            loss = nn.functional.cross_entropy(model(pixel_values=x).logits, targets[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            bar.update()
    bar.close()
    return losses


@torch.no_grad()
def predict(model, inputs: torch.Tensor, batch: int = 512) -> np.ndarray:
    model.eval()
    where = _device_of(model)
    return torch.cat([model(pixel_values=inputs[i:i + batch].to(where)).logits.argmax(-1).cpu()
                      for i in range(0, len(inputs), batch)]).numpy()


def fit_probe(model, representation: torch.Tensor, labels: np.ndarray, steps: int, lr: float, seed: int) -> nn.Linear:
    """A new two-way linear classifier on the frozen representation (full-batch Adam),
    installed as ``model.classifier`` on the model's device: the paper's setting of a
    linear head on a pretrained backbone. It is trained where ``representation`` is (the
    host, where decompose keeps it)."""
    torch.manual_seed(seed)
    probe = nn.Linear(representation.shape[1], 2).to(representation.device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    targets = torch.as_tensor(labels, device=representation.device)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(probe(representation), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.classifier = probe.to(_device_of(model)).eval()
    model.config.num_labels = 2
    return probe


# ----------------------------------------------------------------------------- the chapter's pipeline

_BOOK = {
    "architectures": ["vit", "dinov2"], "width": 64, "depth": 4, "heads": 4, "epochs": 20, "lr": 1.5e-3,
    "n_train": 6000, "n_test": 2000, "agreement": 0.95, "image_size": 48, "probe_steps": 300,
    "clip": "cliplike", "image_model": "efficientnet-lite0", "text_model": "minilm-l6",
    "n_align": 2000, "align_steps": 200, "orthogonality_weight": 0.1, "top_k": 2, "neighbours": 5,
    "random_sets": 50, "seed": 0, "threads": 2,
    # where the ViTs compute (config.device): the book's numbers were measured on the CPU
    "device": "cpu",
    # images per RepDecompose batch (vitdecomp.decompose): memory only
    "decompose_batch": 256,
}
PRESETS = {
    "smoke": {**_BOOK, "width": 32, "depth": 2, "heads": 2, "epochs": 1, "lr": 2e-3, "n_train": 240, "n_test": 60,
              "probe_steps": 50, "image_model": "tiny-efficientnet", "text_model": "tiny-bert-encoder",
              "n_align": 120, "align_steps": 5, "random_sets": 5},
    "book": _BOOK,
    # pretrained hub backbones with a linear probe, as the paper (the ViT-trained-here settings
    # do not apply); Swin and MaxViT are not supported by this RepDecompose; the paper's
    # Waterbirds is not wired in
    "paper": {**_BOOK, "architectures": ["facebook/deit-base-patch16-224", "facebook/dino-vitb16",
                                         "facebook/dinov2-base"],
              "n_train": 5000, "probe_steps": 500, "clip": "clip-vit-b-16", "n_align": 5000, "align_steps": 1000,
              "top_k": 10, "threads": 16, "device": "auto",
              # 16 × ~0.8 GB a DINOv2-B image at 518 px: ~13 GB (256 would hold ~209 GB)
              "decompose_batch": 16},
}

# what each parameter may be: checked before any model loads (config.resolve); not part
# of the chapter's code version, since a rule never changes a run it accepts
def parameter_rules():
    from . import cliplike
    from .config import at_paper, device, folder, hub_id, integer, items, model, number, one_of, relation

    return {
        "architectures": items(one_of(*ARCHITECTURES) | at_paper(hub_id()) | folder()),
        "width": integer(8),
        "depth": integer(1),
        "heads": integer(1),
        "epochs": integer(1),
        "lr": number(above=0, maximum=1),
        "n_train": integer(10),
        "n_test": integer(10),
        "agreement": number(above=0.5, maximum=1),  # the share of images whose background agrees with the label
        "image_size": integer(16, 512, multiple_of=8),  # 8-pixel patches
        "probe_steps": integer(1),
        "clip": one_of(lambda: cliplike.CLIPS),
        "image_model": model("image-classifier"),
        "text_model": model("sentence-encoder"),
        "n_align": integer(1),  # at most: the first n_align training images
        "align_steps": integer(1),
        "orthogonality_weight": number(minimum=0),
        "top_k": integer(1),
        "neighbours": integer(1),
        "random_sets": integer(1),
        "seed": integer(0),
        "threads": integer(1),
        "device": device(),
        "decompose_batch": integer(1),
        "heads_divide_width": relation("width, heads", "width must be a multiple of heads",
                                       lambda v: v["width"] % v["heads"] == 0),
        "neighbours_within_test": relation("neighbours, n_test", "neighbours must be < n_test",
                                           lambda v: v["neighbours"] < v["n_test"]),
        # C3 ablates top_k of the official granularity's components (one before the decomposed layers)
        "top_k_within_components": relation(
            "top_k, depth, heads, architectures",
            "top_k must be smaller than the official granularity's 1 + (depth - first decomposed layer) x (heads + 1) "
            "components", lambda v: not set(v["architectures"]) <= set(ARCHITECTURES)
            or v["top_k"] < 1 + (v["depth"] - official_first_layer(v["depth"])) * (v["heads"] + 1)),
    }

# the texts that describe each feature (CompAttribute's B), in the CLIP space's own words
FEATURE_TEXTS = {
    "location": ["a photo taken on the water", "a photo of a lake", "a photo of the sea", "a photo taken on grass",
                 "a photo of a field", "a photo taken on land"],
    "colour": [f"a photo of something {c}" for c in
               ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray")],
    "object": [f"a photo of a {c}" for c in
               ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")],
}


def feature_labels(dataset: SpuriousSet) -> dict[str, np.ndarray]:
    """The ground truth each feature's retrieval is judged by."""
    return {"location": dataset.backgrounds, "colour": dataset.colours, "object": dataset.classes}


def model_inputs(model, images: np.ndarray, scratch: bool) -> torch.Tensor:
    if scratch:
        return to_tensor(images)  # [-1, 1], as the from-scratch ViTs were trained
    return to_tensor(images, model.config.image_size, IMAGENET_MEAN, IMAGENET_STD)


def load_classifier(name: str, cfg, pretrain: SpuriousSet, progress: bool = True):
    """``vit`` / ``dinov2``: built here and trained on the 10 CIFAR classes (cached outside
    the repo under a hash of the images, the settings and the code); any other name: a
    pretrained hub id or saved folder, loaded with a fresh two-way head (paper preset).
    Either way on ``cfg.device`` (the ViTs trained here train on the CPU, as the book's
    did). Returns the model and how it came to be."""
    import hashlib
    import json
    import time
    from pathlib import Path

    from transformers import AutoConfig, Dinov2ForImageClassification, ViTForImageClassification

    from .config import run_device
    from .paths import cache_dir, cached_dir, code_hash

    where = run_device(cfg.device)
    if name in ARCHITECTURES:
        settings = {k: cfg[k] for k in ("width", "depth", "heads", "epochs", "lr", "image_size", "seed")}
        digest = hashlib.sha256(pretrain.images.tobytes() + pretrain.classes.tobytes() + json.dumps(settings).encode()
                                + code_hash(build_model, train_classifier).encode()).hexdigest()[:20]

        def build(tmp: Path) -> dict:
            model = build_model(name, cfg.image_size, cfg.width, cfg.depth, cfg.heads, cfg.seed)
            start = time.perf_counter()
            losses = train_classifier(model, to_tensor(pretrain.images), pretrain.classes, cfg.epochs, cfg.lr, 128,
                                      cfg.seed, progress=f"pre-train {name}" if progress else None)
            model.save_pretrained(tmp)
            return {"architecture": name, **settings, "train_seconds": round(time.perf_counter() - start, 1),
                    "final_loss": losses[-1], "images": len(pretrain.images)}

        # verified on every load (sha256 of each file): a damaged entry is trained again, never served
        folder = cache_dir("vitdecomp") / f"{name}-{digest}"
        manifest, _ = cached_dir(folder, build)
        cls = ViTForImageClassification if name == "vit" else Dinov2ForImageClassification
        return cls.from_pretrained(folder).to(where).eval(), manifest
    if cfg.preset != "paper" and not Path(name).is_dir():
        raise ValueError(f"architecture {name!r} is a hub id; the {cfg.preset!r} preset runs offline. Use "
                         f"preset='paper', a saved folder, or one of: {', '.join(ARCHITECTURES)}")
    from .models import source_revision

    revision = source_revision(name)  # a hub id loads at its pinned commit
    model_type = AutoConfig.from_pretrained(name, revision=revision).model_type
    classes = {"vit": ViTForImageClassification, "dinov2": Dinov2ForImageClassification}
    if model_type not in classes:
        raise ValueError(f"{name}: model type {model_type!r}; RepDecompose here supports {', '.join(classes)}")
    model = classes[model_type].from_pretrained(name, num_labels=2, ignore_mismatched_sizes=True, revision=revision)
    return model.to(where).eval(), {"architecture": name, "pretrained": True}


def one_view_each(n_test: int) -> np.ndarray:
    """Indices into a test set that shows every photo on both backgrounds (land half,
    then water half) picking each photo once, alternating backgrounds: retrieval must not
    find the same photo on the other background."""
    i = np.arange(n_test)
    return np.where(i % 2 == 0, i, i + n_test)


@torch.no_grad()
def random_ablations(model, decomposition: Decomposition, means: torch.Tensor, dataset: SpuriousSet, k: int,
                     n_sets: int, seed: int) -> list[float]:
    """Worst-group accuracy after mean-ablating ``n_sets`` random sets of ``k`` components."""
    rng = np.random.default_rng(seed)
    n = decomposition.contributions.shape[1]
    return [group_accuracies(ablated_logits(model, decomposition, list(rng.choice(n, k, replace=False)), means)
                             .argmax(-1).numpy(), dataset)["worst group"] for _ in range(n_sets)]


@torch.no_grad()
def predict_from(model, decomposition: Decomposition) -> np.ndarray:
    """The classifier's predictions on a decomposition's (unablated) representation."""
    return model.classifier(decomposition.representation.to(_device_of(model))).argmax(-1).cpu().numpy()
