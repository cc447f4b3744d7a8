"""IntCoOp (Ghosal et al., EMNLP 2024, arXiv 2406.13683) and CoOp (Zhou et al., 2022):
prompt tuning on chapter 03's CLIP-like model, whose image side is learned from
captions (:mod:`replbook.captionclip`).

A prompt is a sequence of input embeddings fed to the frozen text encoder (MiniLM):

    CoOp:     [CLS] v_1 … v_M          CLASS [SEP]
    IntCoOp:  [CLS] v_1 … v_M   a(x)   CLASS [SEP]

with learned context vectors ``v`` (initialised from "a photo of a") and, for IntCoOp,
an attribute token ``a(x)`` predicted from the image. Only ``v`` and the attribute head
learn; gradients reach ``v`` through the real, frozen encoder.

Deviation from the paper, for a 2-core CPU: the attribute token lives on the attribute
vocabulary's simplex, ``a(x) = Σ_k q_k(x) E(attr_k)``, and the encoder is linearised
over that mixture at its output — the class feature for image x is
``normalize(Σ_k q_k(x) · T([v, attr_k, CLASS]))`` — so each step encodes K × C prompts
instead of one per (image, class). The context is not image-conditioned (the paper
conditions it by cross-attention). The loss is the paper's three terms:
cross-entropy + λ_attr · attribute loss (here the cross-entropy of q(x) against the
measured attribute) + λ_reg · ‖g_c(x) − T("a photo of a {attr(x)} {CLASS}")‖², per image
and class, toward the hand-written prompt naming the image's own attribute (KgCoOp-style;
λ_reg = 8 is KgCoOp's default).

The rest of the module is chapter 03's experiment: its presets, the datasets
(CIFAR-10, painted Fashion-MNIST, synthetic shapes for the smoke preset), measured
attribute labels, corruptions for the domain shift, cached image features,
:func:`run_seed` (zero-shot, CoOp and IntCoOp on one few-shot draw) and the readings
behind the three claims (:func:`alignment_gain`, :func:`attribute_readings`).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import cliplike
from .captionclip import CaptionedClip
from .cliplike import ClipLike
from .results import mean_interval  # noqa: F401  (chapter 03 calls intcoop.mean_interval)


def clip_device(model: ClipLike) -> torch.device:
    """Where ``model`` computes: an open_clip CLIP on its ``device`` (cliplike.OpenClip), the
    book's captioned CLIP-like model on the CPU. A prompt learner trains there."""
    return torch.device(getattr(model, "device", "cpu"))


def method_device(method) -> torch.device:
    """Where a prompt learner (or the zero-shot prompts) computes: its first tensor's device;
    the CPU for a method that holds no tensors."""
    tensors = itertools.chain(method.parameters(), method.buffers()) if isinstance(method, nn.Module) else ()
    return next((t.device for t in tensors), torch.device("cpu"))


class PromptLearner(nn.Module):
    """Learned context vectors and the fixed token embeddings of classes and attributes, on
    the CLIP's device (its token embeddings are)."""

    def __init__(self, model: ClipLike, class_names: list[str], attributes: list[str] = (),
                 init: str = "a photo of a"):
        super().__init__()
        self.model = model
        for p in model.text_encoder.parameters():
            p.requires_grad_(False)
        words = lambda text: model.token_embeddings(torch.tensor(model.word_ids(text))).detach()
        self.context = nn.Parameter(words(init).clone())
        self.class_tokens = [words(name) for name in class_names]
        self.attribute_tokens = [words(a) for a in attributes]
        self.cls = model.token_embeddings(torch.tensor([model.start_id])).detach()
        self.sep = model.token_embeddings(torch.tensor([model.end_id])).detach()

    @property
    def n_context(self) -> int:
        return self.context.shape[0]

    def features(self, classes: list[int], attribute: int | None = None) -> torch.Tensor:
        """Joint-space text features (C, d) of the prompts for ``classes``, with the
        attribute word ``attribute`` between the context and the class name if given."""
        sequences = []
        for c in classes:
            parts = [self.cls, self.context]
            if attribute is not None:
                parts.append(self.attribute_tokens[attribute])
            parts += [self.class_tokens[c], self.sep]
            sequences.append(torch.cat(parts))
        length = max(len(s) for s in sequences)
        embeds = torch.zeros(len(sequences), length, self.cls.shape[-1], device=self.cls.device)
        mask = torch.zeros(len(sequences), length, dtype=torch.long, device=self.cls.device)
        for i, s in enumerate(sequences):
            embeds[i, :len(s)], mask[i, :len(s)] = s, 1
        return self.model.encode_embeddings(embeds, mask)


class CoOp(nn.Module):
    """Learned context shared by all classes; logits = scale · cos(image, text)."""

    def __init__(self, model: ClipLike, class_names: list[str], scale: float = 30.0):
        super().__init__()
        self.prompts = PromptLearner(model, class_names)
        self.scale = scale

    def logits(self, images: torch.Tensor, classes: list[int]) -> torch.Tensor:
        return self.scale * images @ self.prompts.features(classes).T

    def loss(self, images, labels, classes, attributes=None):
        return nn.functional.cross_entropy(self.logits(images, classes), labels)


class KgCoOp(CoOp):
    """CoOp plus KgCoOp's pull (Yao et al., CVPR 2023) of every learned class prompt toward
    the hand-written "a photo of a {class}": λ · mean_c ‖g_c − hand(c)‖². IntCoOp's
    regulariser without the attribute, so IntCoOp − KgCoOp is the attribute token's own
    part of IntCoOp − CoOp."""

    def __init__(self, model: ClipLike, class_names: list[str], scale: float = 30.0, regularizer_weight: float = 8.0):
        super().__init__(model, class_names, scale)
        self.regularizer_weight = regularizer_weight
        self.register_buffer("hand", model.embed_texts([f"a photo of a {name}" for name in class_names]).to(clip_device(model)))

    def loss(self, images, labels, classes, attributes=None):
        features = self.prompts.features(classes)
        task = nn.functional.cross_entropy(self.scale * images @ features.T, labels)
        return task + self.regularizer_weight * ((features - self.hand[classes]) ** 2).sum(-1).mean()


class IntCoOp(nn.Module):
    """CoOp plus an image-predicted attribute token, its supervision and the
    hand-prompt regulariser (see the module docstring)."""

    def __init__(self, model: ClipLike, class_names: list[str], attributes: list[str], scale: float = 30.0,
                 attribute_weight: float = 1.0, regularizer_weight: float = 8.0):
        super().__init__()
        self.prompts = PromptLearner(model, class_names, attributes)
        self.attribute_head = nn.Linear(model.dim, len(attributes)).to(clip_device(model))  # drawn on the CPU, as before
        self.scale, self.attribute_weight, self.regularizer_weight = scale, attribute_weight, regularizer_weight
        self.class_names, self.attributes, self.model = class_names, attributes, model
        self._hand: dict[tuple[int, ...], torch.Tensor] = {}

    def attribute_probs(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.attribute_head(images), dim=-1)

    def _per_attribute(self, classes: list[int]) -> torch.Tensor:  # K x C x d
        return torch.stack([self.prompts.features(classes, k) for k in range(len(self.attributes))])

    def logits(self, images: torch.Tensor, classes: list[int]) -> torch.Tensor:
        return self._logits(images, self._per_attribute(classes))

    def _mixed(self, images, per_attribute):  # N x C x d: each image's prompt features, a(x) in place
        mixed = torch.einsum("nk,kcd->ncd", self.attribute_probs(images), per_attribute)
        return nn.functional.normalize(mixed, dim=-1)

    def _logits(self, images, per_attribute):
        return self.scale * torch.einsum("nd,ncd->nc", images, self._mixed(images, per_attribute))

    def hand_prompts(self, classes: list[int]) -> torch.Tensor:  # K x C x d, "a photo of a {attr} {class}"
        key = tuple(classes)
        if key not in self._hand:
            self._hand[key] = torch.stack([self.model.embed_texts([f"a photo of a {a} {self.class_names[c]}" for c in classes])
                                           for a in self.attributes]).to(clip_device(self.model))
        return self._hand[key]

    def attribute_loss(self, images: torch.Tensor, attributes: torch.Tensor) -> torch.Tensor:
        """λ_a's term: the cross-entropy of q(x) against each image's attribute label."""
        return nn.functional.cross_entropy(self.attribute_head(images), attributes)

    def regularizer(self, mixed: torch.Tensor, classes: list[int], attributes: torch.Tensor) -> torch.Tensor:
        """λ_r's term, per image as in the paper: for image i and every class c, the squared
        distance between its prompt's feature g_c(x_i) (``mixed``, N x C x d) and the
        hand-written "a photo of a {attr(x_i)} {class c}" with the image's *own* attribute."""
        return ((mixed - self.hand_prompts(classes)[attributes]) ** 2).sum(-1).mean()

    def loss(self, images, labels, classes, attributes):
        mixed = self._mixed(images, self._per_attribute(classes))
        task = nn.functional.cross_entropy(self.scale * torch.einsum("nd,ncd->nc", images, mixed), labels)
        return (task + self.attribute_weight * self.attribute_loss(images, attributes)
                + self.regularizer_weight * self.regularizer(mixed, classes, attributes))


METHODS = {"coop": CoOp, "kgcoop": KgCoOp, "intcoop": IntCoOp}


@dataclass
class FewShot:
    """Image embeddings (joint space), class labels and measured attribute labels."""

    images: torch.Tensor
    labels: np.ndarray
    attributes: np.ndarray


def train(method: nn.Module, data: FewShot, classes: list[int], steps: int, lr: float, seed: int,
          progress: str | None = None) -> list[float]:
    """Full-batch Adam on the few-shot set, labels re-indexed into ``classes``, on the
    method's device (the images, kept on the host, go there once)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    where = method_device(method)
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[int(c)] for c in data.labels], device=where)
    attributes = torch.as_tensor(data.attributes, device=where)
    images = data.images.to(where)
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in tqdm(range(steps), desc=progress, disable=progress is None):
        loss = method.loss(images, labels, classes, attributes)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def accuracy(method: nn.Module, data: FewShot, classes: list[int]) -> float:
    """Top-1 accuracy among ``classes`` on the images whose label is one of them."""
    keep = np.isin(data.labels, classes)
    index = {c: i for i, c in enumerate(classes)}
    predicted = method.logits(data.images[keep].to(method_device(method)), classes).argmax(1).cpu().numpy()
    return float((predicted == np.array([index[int(c)] for c in data.labels[keep]])).mean())


def harmonic_mean(base: float, novel: float) -> float:
    """The base-to-novel summary of CoOp/CoCoOp/IntCoOp: 2·b·n / (b + n)."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


class ZeroShot(nn.Module):
    """The hand-written prompt "a photo of a {class}": no parameters, the zero-shot baseline."""

    def __init__(self, model, class_names: list[str], scale: float = 30.0, template: str = "a photo of a {}"):
        super().__init__()
        self.register_buffer("text", model.embed_texts([template.format(c) for c in class_names]).to(clip_device(model)))
        self.scale = scale

    def logits(self, images: torch.Tensor, classes: list[int]) -> torch.Tensor:
        return self.scale * images @ self.text[classes].T


# ----------------------------------------------------------------------------- presets

PRESETS = {
    "smoke": {
        "clip": "captioned", "image_model": "tiny-efficientnet", "text_model": "tiny-bert-encoder",
        "colour_caption_share": 1.0, "n_align": 120, "align_epochs": 3, "image_size": 64,
        "datasets": ["synthetic-shapes"], "pool_size": 120, "n_test": 60, "shots": 4, "steps": 3, "lr": 1e-2,
        "scale": 30.0, "attribute_weight": 1.0, "regularizer_weight": 8.0,
        "corruptions": ["grayscale", "blur", "noise"], "seeds": [0], "data_seed": 0, "threads": 2,
        "device": "cpu",
    },
    "book": {
        "clip": "captioned", "image_model": "efficientnet-lite0", "text_model": "minilm-l6",
        "colour_caption_share": 1.0, "n_align": 3000, "align_epochs": 40, "image_size": 128,
        "datasets": ["cifar10", "fashion-tinted"], "pool_size": 1000, "n_test": 1000, "shots": 16, "steps": 60,
        "lr": 1e-2, "scale": 30.0, "attribute_weight": 1.0, "regularizer_weight": 8.0,
        "corruptions": ["grayscale", "blur", "noise"], "seeds": [0, 1, 2], "data_seed": 0, "threads": 2,
        # where the CLIP and the prompt learners compute (config.device): the book's numbers were
        # measured on the CPU, and its captioned CLIP-like model computes only there
        "device": "cpu",
    },
    "paper": {
        # the paper's CLIP; its ten datasets (ImageNet, Caltech101, ...) are not wired in
        "clip": "clip-vit-b-16", "image_model": "", "text_model": "", "colour_caption_share": 0.0, "n_align": 0,
        "align_epochs": 0, "image_size": 224, "datasets": ["cifar10", "fashion-tinted"], "pool_size": 2000, "n_test": 4000,
        "shots": 16, "steps": 200, "lr": 2e-3, "scale": 100.0, "attribute_weight": 1.0,
        "regularizer_weight": 8.0, "corruptions": ["grayscale", "blur", "noise"], "seeds": [1, 2, 3],
        "data_seed": 0, "threads": 16, "device": "auto",
    },
}

# what each parameter may be: checked before any model loads (config.resolve); not part
# of the chapter's code version, since a rule never changes a run it accepts
def parameter_rules():
    from .config import device, integer, items, model, number, one_of, relation

    # an open_clip CLIP (paper preset) has both towers, so it names no image or text model
    unused = one_of("")
    return {
        "clip": one_of(lambda: CLIPS),
        "image_model": model("image-classifier") | unused,
        "text_model": model("sentence-encoder") | unused,
        "colour_caption_share": number(0, 1),
        "n_align": integer(0),
        "align_epochs": integer(0),
        "image_size": integer(32, 1024),
        "datasets": items(one_of(lambda: DATASETS)),
        "pool_size": integer(1),
        "n_test": integer(1),
        "shots": integer(1),
        "steps": integer(1),
        "lr": number(above=0, maximum=1),
        "scale": number(above=0),
        "attribute_weight": number(minimum=0),
        "regularizer_weight": number(minimum=0),
        "corruptions": items(one_of(lambda: CORRUPTIONS)),
        "seeds": items(integer(0)),
        "data_seed": integer(0),
        "threads": integer(1),
        "device": device(),
        "captioned_on_cpu": relation("clip, device", "the book's CLIP (clip='captioned') computes on the CPU: device='cpu'",
                                     lambda v: v["clip"] != "captioned" or v["device"] == "cpu"),
        "book_towers": relation("clip, image_model, text_model",
                                "the book's CLIP (clip='captioned') needs an image_model and a text_model",
                                lambda v: v["clip"] != "captioned" or bool(v["image_model"] and v["text_model"])),
        "alignment": relation("clip, n_align, align_epochs",
                              "the book's CLIP (clip='captioned') learns its image side: n_align ≥ 20 and align_epochs ≥ 1",
                              lambda v: v["clip"] != "captioned" or (v["n_align"] >= 20 and v["align_epochs"] >= 1)),
        "cifar_halves": relation("datasets, pool_size, n_align, n_test",
                                 "cifar10 has 5,000 images per half: pool_size + n_align ≤ 5000 and n_test ≤ 5000",
                                 lambda v: "cifar10" not in v["datasets"]
                                 or (v["pool_size"] + v["n_align"] <= 5000 and v["n_test"] <= 5000)),
        "few_shot": relation("shots, pool_size", "shots must be ≤ pool_size (the few-shot sets are drawn from the pool)",
                             lambda v: v["shots"] <= v["pool_size"]),
    }
# the book's CLIP-like model learns its image side from captions (replbook.captionclip);
# the paper preset's is OpenAI's CLIP; the tests' a tiny random open_clip model
CLIPS = ("captioned", "clip-vit-b-16", "tiny-open-clip")


def load_clip(cfg):
    """The joint image-text model a preset names; the captioned one still has to be
    aligned (:func:`align_clip`) before it embeds images."""
    if cfg.clip == "captioned":
        return CaptionedClip(cfg.preset, cfg.image_model, cfg.text_model, image_size=cfg.image_size,
                             colour_caption_share=cfg.colour_caption_share, align_epochs=cfg.align_epochs)
    return cliplike.load(cfg.clip, cfg.preset, device=cfg.device)


# ----------------------------------------------------------------------------- datasets

DATASETS = ("cifar10", "fashion-tinted", "synthetic-shapes")
# the colours Fashion-MNIST garments are painted in (RGB at full intensity); "gray" leaves them as they are
TINTS = {"red": (220, 30, 30), "orange": (240, 140, 20), "yellow": (240, 220, 30), "green": (40, 170, 50),
         "blue": (30, 70, 220), "purple": (130, 40, 180), "pink": (240, 100, 190), "brown": (120, 70, 30),
         "black": (20, 20, 20), "gray": (128, 128, 128)}


@dataclass
class Dataset:
    """A few-shot pool, a test set and an alignment split (what the captioned CLIP-like
    model learns its image side from; disjoint from the other two), RGB uint8, with class
    labels. ``test_colours``: each test image's true colour (index into
    ``cliplike.COLOURS``) where the data knows it (painted or drawn), else None."""

    name: str
    class_names: list[str]
    pool_images: np.ndarray
    pool_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    align_images: np.ndarray
    align_labels: np.ndarray
    test_colours: np.ndarray | None = None

    @property
    def base(self) -> list[int]:  # the first half of the classes, as CoCoOp's protocol splits them
        return list(range(len(self.class_names) // 2))

    @property
    def novel(self) -> list[int]:
        return list(range(len(self.class_names) // 2, len(self.class_names)))


def tint(gray: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Paint light-on-black grayscale garments in a random colour from ``TINTS`` on a white
    background: pixel = white · (1 − g) + colour · g, with g the garment's intensity.
    Returns the images and each one's paint (index into ``cliplike.COLOURS``)."""
    from .cliplike import COLOURS

    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(TINTS), len(gray))
    colours = np.array(list(TINTS.values()), dtype=np.float64)[drawn]
    g = gray[..., None].astype(np.float64) / 255
    paint = np.array([COLOURS.index(name) for name in TINTS])[drawn]
    return np.round(255 * (1 - g) + colours[:, None, None, :] * g).astype(np.uint8), paint


SHAPES = ("circle", "square", "triangle", "cross")


def synthetic_shapes(n: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coloured shapes on a light background (the smoke preset's stand-in data): images,
    shape labels and each shape's colour (index into ``cliplike.COLOURS``)."""
    from skimage.draw import disk, polygon, rectangle

    from .cliplike import COLOURS

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPES), n)
    images = np.full((n, size, size, 3), 235, np.uint8)
    paint = np.zeros(n, np.int64)
    c, r = size / 2, size / 3
    for i, label in enumerate(labels):
        drawn = int(rng.integers(0, len(TINTS)))
        colour = np.array(list(TINTS.values())[drawn], np.uint8)
        paint[i] = COLOURS.index(list(TINTS)[drawn])
        if label == 0:
            areas = [disk((c, c), r, shape=(size, size))]
        elif label == 1:
            areas = [rectangle((c - r, c - r), (c + r, c + r), shape=(size, size))]
        elif label == 2:
            areas = [polygon([c - r, c + r, c + r], [c, c - r, c + r], shape=(size, size))]
        else:  # two bars
            areas = [rectangle((c - r, c - 3), (c + r, c + 3), shape=(size, size)),
                     rectangle((c - 3, c - r), (c + 3, c + r), shape=(size, size))]
        for rows, cols in areas:
            images[i, np.asarray(rows, int), np.asarray(cols, int)] = colour
    return images, labels.astype(np.int64), paint


def load_dataset(name: str, pool_size: int, n_test: int, seed: int, n_align: int = 0) -> Dataset:
    """``cifar10``: the CIFAR-10 test set (the only split to be had offline) shuffled with
    ``seed`` and split in two halves: the first half holds the pool (its start) and the
    alignment split (its last ``n_align`` images), the second the test set;
    ``fashion-tinted``: Fashion-MNIST's train split holds the pool (its start) and the
    alignment split (its end), its test split the test set, garments painted
    (:func:`tint`, each part with its own seed); ``synthetic-shapes``: drawn here (smoke
    preset)."""
    from . import data

    if name == "cifar10":
        images, labels = data.cifar10_test()
        order = np.random.default_rng(seed).permutation(len(images))  # bigbench ships the images sorted by class
        images, labels, half = images[order], labels[order], len(images) // 2
        if pool_size + n_align > half:
            raise ValueError(f"pool_size + n_align = {pool_size + n_align}: cifar10 has {half} images for both")
        return Dataset(name, list(data.CIFAR10_CLASSES), images[:pool_size], labels[:pool_size],
                       images[half:half + n_test], labels[half:half + n_test],
                       images[half - n_align:half], labels[half - n_align:half])
    if name == "fashion-tinted":
        pool, pool_labels = data.fashion_mnist("train")
        test, test_labels = data.fashion_mnist("test")
        if pool_size + n_align > len(pool):
            raise ValueError(f"pool_size + n_align = {pool_size + n_align}: fashion-tinted has {len(pool)} images for both")
        test_images, test_colours = tint(test[:n_test], seed + 1)
        return Dataset(name, list(data.FASHION_MNIST_CLASSES), tint(pool[:pool_size], seed)[0], pool_labels[:pool_size],
                       test_images, test_labels[:n_test], tint(pool[len(pool) - n_align:], seed + 2)[0],
                       pool_labels[len(pool) - n_align:], test_colours)
    if name == "synthetic-shapes":
        images, labels, colours = synthetic_shapes(pool_size + n_test, seed)
        align_images, align_labels, _ = synthetic_shapes(n_align, seed + 2)
        return Dataset(name, list(SHAPES), images[:pool_size], labels[:pool_size], images[pool_size:],
                       labels[pool_size:], align_images, align_labels, colours[pool_size:])
    raise ValueError(f"dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def few_shot(labels: np.ndarray, classes: list[int], shots: int, seed: int) -> np.ndarray:
    """``shots`` pool indices per class in ``classes``, drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    picked = []
    for c in classes:
        candidates = np.flatnonzero(labels == c)
        if len(candidates) < shots:
            raise ValueError(f"class {c} has {len(candidates)} images in the pool, fewer than shots={shots}")
        picked.append(rng.choice(candidates, shots, replace=False))
    return np.concatenate(picked)


CORRUPTIONS = {
    "grayscale": "luma copied to the three channels (removes colour, the attribute)",
    "blur": "Gaussian blur, sigma 1 px at the native resolution",
    "noise": "Gaussian pixel noise, std 0.12",
}


def corrupt(images: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """The domain shifts: fixed-strength corruptions of uint8 RGB images (``CORRUPTIONS``)."""
    import torchvision.transforms.functional as TF

    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
    if kind == "grayscale":
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    elif kind == "blur":
        x = TF.gaussian_blur(x, kernel_size=5, sigma=1.0)
    elif kind == "noise":
        x = x + 0.12 * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    else:
        raise ValueError(f"corruption {kind!r}; choose one of: {', '.join(CORRUPTIONS)}")
    return (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()


def measured_attributes(images: np.ndarray) -> np.ndarray:
    """The attribute labels (stand-in for the paper's BLIP-2 captions): each image's
    dominant central colour, measured (:func:`replbook.cliplike.dominant_colour`)."""
    from .cliplike import dominant_colour

    return dominant_colour(images)


# image features of either joint model, cached and checksummed (shared with chapter 09)
cached_features = cliplike.cached_features


def align_clip(model, datasets: list[Dataset], seed: int, progress: bool = True):
    """Fit the captioned CLIP-like model's image side on the alignment splits of all
    ``datasets`` at once (one model for the chapter, like one CLIP), captions naming each
    image's measured colour (:func:`measured_attributes`) with the model's
    ``colour_caption_share``. Other models come pretrained: returned unchanged."""
    if not isinstance(model, CaptionedClip):
        return model
    from .cliplike import COLOURS

    features, labels, colours, names = [], [], [], []
    for ds in datasets:
        features.append(cached_features(model, ds.align_images, progress=f"{ds.name}: alignment images" if progress else None))
        labels.append(ds.align_labels + len(names))
        colours.append(measured_attributes(ds.align_images))
        names += ds.class_names
    return model.align(np.concatenate(features), np.concatenate(labels), np.concatenate(colours), names,
                       list(COLOURS), seed, progress="aligning the image side" if progress else None)


# ----------------------------------------------------------------------------- the experiment

# KgCoOp: CoOp with IntCoOp's pull toward the hand-written prompt but no attribute (the
# ablation that tells the attribute token's part from the regulariser's)
METHOD_NAMES = ("zero-shot", "CoOp", "KgCoOp", "IntCoOp")


@dataclass
class Embedded:
    """One dataset in the joint space: few-shot pool and test images, the base-class test
    images under each corruption, and the measured attributes."""

    dataset: Dataset
    pool: torch.Tensor
    test: torch.Tensor
    shifted: dict[str, torch.Tensor]
    pool_attributes: np.ndarray
    test_attributes: np.ndarray
    shifted_labels: np.ndarray


def embed_dataset(model, ds: Dataset, corruptions: list[str], seed: int) -> Embedded:
    """Features of every image the experiment needs (cached), in the joint space."""
    base_test = np.isin(ds.test_labels, ds.base)
    shifted = {kind: model.embed_features(cached_features(
        model, corrupt(ds.test_images[base_test], kind, seed), progress=f"{ds.name}: {kind} images"))
        for kind in corruptions}
    return Embedded(ds, model.embed_features(cached_features(model, ds.pool_images, progress=f"{ds.name}: pool")),
                    model.embed_features(cached_features(model, ds.test_images, progress=f"{ds.name}: test")),
                    shifted, measured_attributes(ds.pool_images), measured_attributes(ds.test_images),
                    ds.test_labels[base_test])


def build_method(name: str, model, class_names: list[str], cfg) -> nn.Module:
    from .cliplike import COLOURS

    if name == "zero-shot":
        return ZeroShot(model, class_names, scale=cfg.scale)
    if name == "CoOp":
        return CoOp(model, class_names, scale=cfg.scale)
    if name == "KgCoOp":
        return KgCoOp(model, class_names, scale=cfg.scale, regularizer_weight=cfg.regularizer_weight)
    if name == "IntCoOp":
        return IntCoOp(model, class_names, list(COLOURS), scale=cfg.scale, attribute_weight=cfg.attribute_weight,
                       regularizer_weight=cfg.regularizer_weight)
    raise ValueError(f"method {name!r}; choose one of: {', '.join(METHOD_NAMES)}")


@torch.no_grad()
def nearest_attribute(method: IntCoOp, images: torch.Tensor) -> np.ndarray:
    """C3's reading of the learned attribute token a(x) = Σ_k q_k(x) E(attr_k): the index of
    the attribute word whose (mean token) input embedding is nearest to it by cosine."""
    words = torch.stack([t.mean(0) for t in method.prompts.attribute_tokens])
    token = method.attribute_probs(images.to(words.device)) @ words
    return (nn.functional.normalize(token, dim=-1) @ nn.functional.normalize(words, dim=-1).T).argmax(1).cpu().numpy()


@torch.no_grad()
def nearest_words(method: IntCoOp, images: torch.Tensor, k: int = 3) -> list[list[str]]:
    """The ``k`` tokens of the text encoder's whole vocabulary nearest to a(x) by cosine."""
    model = method.model
    vocabulary = model.vocabulary()
    table = nn.functional.normalize(model.token_embeddings(torch.arange(len(vocabulary))), dim=-1)
    words = torch.stack([t.mean(0) for t in method.prompts.attribute_tokens])
    token = nn.functional.normalize(method.attribute_probs(images.to(words.device)) @ words, dim=-1)
    return [[vocabulary[j] for j in row] for row in (token @ table.T).topk(k, dim=1).indices.tolist()]


def run_seed(model, data: Embedded, cfg, seed: int, progress: bool = True) -> tuple[list[dict], dict]:
    """Train every method on ``cfg.shots`` base-class shots drawn with ``seed``; evaluate on
    base and novel test classes and on the corrupted base-class test images. Returns one
    row per method and the trained IntCoOp (for the attribute readings)."""
    ds = data.dataset
    picked = few_shot(ds.pool_labels, ds.base, cfg.shots, seed)
    train_set = FewShot(data.pool[picked], ds.pool_labels[picked], data.pool_attributes[picked])
    test_set = FewShot(data.test, ds.test_labels, data.test_attributes)
    rows, trained = [], {}
    for name in METHOD_NAMES:
        torch.manual_seed(seed)
        method = build_method(name, model, ds.class_names, cfg)
        if name != "zero-shot":
            train(method, train_set, ds.base, cfg.steps, cfg.lr, seed,
                  progress=f"{ds.name} seed {seed}: {name}" if progress else None)
        base, novel = accuracy(method, test_set, ds.base), accuracy(method, test_set, ds.novel)
        row = {"dataset": ds.name, "seed": seed, "method": name, "base": base, "novel": novel,
               "HM": harmonic_mean(base, novel)}
        for kind, images in data.shifted.items():
            row[kind] = accuracy(method, FewShot(images, data.shifted_labels, data.shifted_labels), ds.base)
        rows.append(row)
        trained[name] = method
    return rows, trained


def attribute_readings(method: IntCoOp, data: Embedded) -> dict:
    """How often the nearest attribute word to a(x) is the image's measured colour (the
    label its head was trained on), on the base and on the novel test classes, next to
    always guessing the commonest colour; where the data knows each image's true colour
    (``Dataset.test_colours``: paint, not a measurement, so never a training label), the
    same against it (``true_*``); and how often the token reads black, white or gray on
    the grayscale base-class images."""
    ds = data.dataset
    nearest = nearest_attribute(method, data.test)
    out = {}
    labels = {"": data.test_attributes}
    if ds.test_colours is not None:
        labels["true_"] = ds.test_colours
    for prefix, attributes in labels.items():
        for split, classes in (("base", ds.base), ("novel", ds.novel)):
            keep = np.isin(ds.test_labels, classes)
            truth = attributes[keep]
            out[f"{prefix}match_{split}"] = float((nearest[keep] == truth).mean())
            out[f"{prefix}majority_{split}"] = float(np.bincount(truth).max() / len(truth))
    if "grayscale" in data.shifted:  # with the colour gone, does the token say so?
        from .cliplike import COLOURS

        achromatic = [COLOURS.index(c) for c in ("black", "white", "gray")]
        out["achromatic_grayscale"] = float(np.isin(nearest_attribute(method, data.shifted["grayscale"]), achromatic).mean())
    return out


@torch.no_grad()
def alignment_gain(model, images: torch.Tensor, labels: np.ndarray, attributes: np.ndarray,
                   class_names: list[str]) -> np.ndarray:
    """C1 per image: cos(image, "a photo of a {measured colour} {class}") − cos(image,
    "a photo of a {class}"), for the image's true class."""
    from .cliplike import COLOURS

    bare = model.embed_texts([f"a photo of a {c}" for c in class_names])
    pairs = sorted({(int(a), int(y)) for a, y in zip(attributes, labels)})
    attributed = dict(zip(pairs, model.embed_texts([f"a photo of a {COLOURS[a]} {class_names[y]}" for a, y in pairs])))
    with_attribute = torch.stack([attributed[(int(a), int(y))] for a, y in zip(attributes, labels)])
    labels = torch.as_tensor(labels)
    return ((images * with_attribute).sum(1) - (images * bare[labels]).sum(1)).numpy()
