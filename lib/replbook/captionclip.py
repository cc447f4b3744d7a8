"""A CLIP-like model whose image side is *learned from captions* (chapter 03).

No CLIP can be had offline. :class:`~replbook.cliplike.ClipLike` (chapter 09) places
images in MiniLM's sentence space without training and writes the measured colour into
the image embedding, so any claim about colour attributes holds there by construction.
This model instead learns where images go, as CLIP does, from images paired with
captions:

- **image features**: EfficientNet-Lite0's pooled 1280-d features next to a coarse RGB
  histogram of the image's centre (:func:`colour_histogram`, 4 × 4 × 4 bins), so colour
  is *available* to the map but named nowhere;
- **the map** (:class:`ImageProjection`): standardised features → a hidden layer (GELU)
  → MiniLM's 384-d space. The hidden layer mixes object and colour features, so the
  embedding is not a sum of an object part and a colour part;
- **training** (:func:`fit_projection`): each image of an *alignment split* (disjoint
  from every image a chapter tests or few-shots on) gets one caption, "a photo of a
  {colour} {class}" (colour = the measured attribute label) with probability
  ``colour_caption_share`` (1 in the book: the captions always name the colour, as a
  descriptive caption would) and "a photo of a {class}" otherwise; the loss is CLIP's
  image-to-text cross-entropy over the distinct captions the split carries, at a learned
  temperature, with dropout and weight decay; the epoch with the lowest loss on a
  held-out tenth of the split is kept.

The text side is :class:`ClipLike`'s, unchanged: MiniLM minus the mean ``μ`` of the
ImageNet class prompts, and prompt learning through MiniLM's input embeddings. The image
embedding therefore carries colour only as well as the map learned it from captions.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from .cliplike import ClipLike

CAPTION = "a photo of a {colour} {name}"
BARE_CAPTION = "a photo of a {name}"
HISTOGRAM_BINS = 4  # per RGB channel


def colour_histogram(images: np.ndarray, bins: int = HISTOGRAM_BINS, centre: float = 0.5) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, bins³): the share of the central ``centre`` x ``centre``
    region's pixels in each RGB cube (no colour names: the map must learn them)."""
    n, height, width = images.shape[:3]
    top, left = round(height * (1 - centre) / 2), round(width * (1 - centre) / 2)
    crop = images[:, top:height - top, left:width - left].reshape(n, -1, 3).astype(np.int64)
    cells = crop * bins // 256
    index = (cells[..., 0] * bins + cells[..., 1]) * bins + cells[..., 2]
    counts = np.stack([np.bincount(row, minlength=bins ** 3) for row in index])
    return (counts / index.shape[1]).astype(np.float32)


class ImageProjection(nn.Module):
    """Standardised image features -> hidden (GELU) -> the joint space (unit vectors)."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, dim: int, hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(len(mean), hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.net((features - self.mean) / self.std), dim=-1)


def caption_texts(class_names: list[str], colours: list[str]) -> list[str]:
    """Every caption an alignment split can produce: the bare caption of each class, then
    each class with each colour (the order :func:`caption_index` uses)."""
    texts = [BARE_CAPTION.format(name=n) for n in class_names]
    return texts + [CAPTION.format(colour=c, name=n) for n in class_names for c in colours]


def caption_index(labels: np.ndarray, colours: np.ndarray, n_classes: int, n_colours: int, share: float,
                  seed: int) -> np.ndarray:
    """Each image's caption in :func:`caption_texts`: its class with its colour with
    probability ``share`` (drawn with ``seed``), its bare class caption otherwise."""
    named = np.random.default_rng(seed).random(len(labels)) < share
    return np.where(named, n_classes + labels * n_colours + colours, labels).astype(np.int64)


def fit_projection(features: torch.Tensor, captions: torch.Tensor, texts: torch.Tensor, seed: int,
                   epochs: int = 40, batch: int = 256, lr: float = 1e-3, hidden: int = 256, dropout: float = 0.5,
                   weight_decay: float = 0.1, progress: str | None = None) -> tuple[ImageProjection, list[dict]]:
    """Train an :class:`ImageProjection` so that each image's embedding picks its caption
    among ``texts`` (unit caption embeddings, (K, d)): cross-entropy of scale · cos, the
    scale learned from 1/0.07 as in CLIP. A tenth of the images (drawn with ``seed``) is
    held out; the epoch with the lowest held-out loss is kept. Returns the projection and
    one row per epoch (train and held-out loss, held-out caption accuracy)."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(len(features), generator=generator)
    n_held = max(1, len(features) // 10)
    held, train = order[:n_held], order[n_held:]
    mean, std = features[train].mean(0), features[train].std(0).clamp(min=1e-4)
    projection = ImageProjection(mean, std, texts.shape[-1], hidden, dropout)
    log_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
    optimizer = torch.optim.AdamW([*projection.parameters(), log_scale], lr=lr, weight_decay=weight_decay)

    def loss_of(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = log_scale.exp().clamp(max=100) * projection(features[index]) @ texts.T
        return nn.functional.cross_entropy(logits, captions[index]), logits

    best, best_state, history = float("inf"), None, []
    for epoch in tqdm(range(epochs), desc=progress, disable=progress is None):
        projection.train()
        shuffled = train[torch.randperm(len(train), generator=generator)]
        total = 0.0
        for start in range(0, len(shuffled), batch):
            loss, _ = loss_of(shuffled[start:start + batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(shuffled[start:start + batch])
        projection.eval()
        with torch.no_grad():
            held_loss, logits = loss_of(held)
        history.append({"epoch": epoch + 1, "train loss": total / len(train), "held-out loss": float(held_loss),
                        "held-out caption accuracy": float((logits.argmax(1) == captions[held]).float().mean())})
        if float(held_loss) < best:
            best, best_state = float(held_loss), copy.deepcopy(projection.state_dict())
    projection.load_state_dict(best_state)
    return projection.eval(), history


class CaptionedClip(ClipLike):
    """:class:`ClipLike`'s text side with an image side learned from captions (see the
    module docstring). Call :meth:`align` before embedding images."""

    def __init__(self, preset: str = "book", image_model: str = "efficientnet-lite0", text_model: str = "minilm-l6",
                 image_size: int = 128, colour_caption_share: float = 1.0, align_epochs: int = 40, hidden: int = 256):
        super().__init__(preset, image_model, text_model, colour_weight=0.0, image_size=image_size)
        self.colour_caption_share, self.align_epochs, self.hidden = colour_caption_share, align_epochs, hidden
        self.projection: ImageProjection | None = None
        self.history: list[dict] = []

    @torch.no_grad()
    def image_features(self, images: np.ndarray, progress: str | None = None, batch: int = 64) -> np.ndarray:
        """(N, 1280 + 64): EfficientNet-Lite0's pooled features next to the centre's RGB histogram."""
        from tqdm.auto import tqdm

        from .models import efficientnet_input

        pooled = [self.image_net.extract_features(efficientnet_input(images[i:i + batch], self.image_size)).mean((2, 3))
                  for i in tqdm(range(0, len(images), batch), desc=progress, disable=progress is None)]
        return np.concatenate([torch.cat(pooled).numpy(), colour_histogram(images)], axis=1).astype(np.float32)

    def align(self, features: np.ndarray, labels: np.ndarray, colours: np.ndarray, class_names: list[str],
              colour_names: list[str], seed: int, progress: str | None = None) -> "CaptionedClip":
        """Fit the image side on an alignment split (features, class labels indexing
        ``class_names``, attribute labels indexing ``colour_names``); returns ``self``."""
        captions = caption_index(labels, colours, len(class_names), len(colour_names), self.colour_caption_share, seed)
        # the contrast is against the captions the split has (CLIP's other images' captions),
        # never against a caption no image carries: a bare "a photo of a {class}" that is
        # only ever a negative would teach the model to avoid it, C1 written in
        used, captions = np.unique(captions, return_inverse=True)
        texts = self.embed_texts([caption_texts(class_names, colour_names)[i] for i in used])
        self.projection, self.history = fit_projection(
            torch.as_tensor(features), torch.as_tensor(captions), texts, seed, epochs=self.align_epochs,
            hidden=self.hidden, progress=progress)
        self.n_captions = len(used)
        return self

    def with_caption_share(self, share: float) -> "CaptionedClip":
        """A copy sharing the pretrained parts, to be aligned with another caption share."""
        other = copy.copy(self)
        other.colour_caption_share, other.projection, other.history = share, None, []
        return other

    @torch.no_grad()
    def embed_features(self, features: np.ndarray) -> torch.Tensor:
        if self.projection is None:
            raise RuntimeError("CaptionedClip: call align() on an alignment split before embedding images")
        return self.projection(torch.as_tensor(features))

    def embed_images(self, images: np.ndarray) -> torch.Tensor:
        return self.embed_features(self.image_features(images))

    def describe(self) -> dict:
        return {"kind": "captionclip", "image_model": self.image_model, "text_model": self.text_model_name,
                "image_size": self.image_size, "colour_caption_share": self.colour_caption_share,
                "align_epochs": self.align_epochs, "hidden": self.hidden}

    @property
    def feature_key(self) -> str:
        from .paths import code_hash

        return f"captionclip/{self.image_model}/{self.image_size}/{code_hash(CaptionedClip.image_features, colour_histogram)}"


__all__ = ["CaptionedClip", "ImageProjection", "caption_index", "caption_texts", "colour_histogram", "fit_projection"]
