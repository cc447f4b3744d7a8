"""A CLIP-like image-text model built from offline parts (chapters 03 and 09).

No CLIP can be had offline, so the joint space is MiniLM's sentence space (384-d),
and images are placed in it without any image-text training:

- **objects**: EfficientNet-Lite0's ImageNet posterior spread over MiniLM embeddings of
  the 1000 class prompts, ``Σ_c p(c | x)^(1/T) · (t_c − μ)`` (the "mix" construction
  measured in ``shared/notes/clip-like-model.md``: ~60% zero-shot on CIFAR-10);
- **colour**: that construction carries almost no colour, which chapter 03's claims are
  about, so the image's *measured* colour (the share of the central pixels under each
  colour name, :func:`colour_shares`) is spread the same way over MiniLM embeddings of
  colour prompts and added with weight ``colour_weight``.

The text side is MiniLM itself, minus the same mean ``μ``; prompt learning feeds
learned vectors into MiniLM's input embeddings (:meth:`ClipLike.encode_embeddings`), so
gradients flow through the real, frozen text encoder.
"""
from __future__ import annotations

import numpy as np
import torch

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray")
# hue ranges in degrees for the chromatic names (red wraps around 0)
_HUES = {"red": [(0, 15), (345, 360)], "orange": [(15, 40)], "yellow": [(40, 70)], "green": [(70, 170)],
         "blue": [(170, 260)], "purple": [(260, 290)], "pink": [(290, 345)]}


def colour_names(images: np.ndarray) -> np.ndarray:
    """Per-pixel colour name indices (into ``COLOURS``) from HSV rules:
    dark -> black; unsaturated -> white or gray; dark orange/red -> brown; else by hue."""
    from skimage.color import rgb2hsv

    hsv = rgb2hsv(images.reshape(-1, *images.shape[-3:]))
    h, s, v = hsv[..., 0] * 360, hsv[..., 1], hsv[..., 2]
    names = np.full(h.shape, COLOURS.index("gray"), dtype=np.int64)
    chromatic = (s >= 0.25) & (v >= 0.2)
    for name, ranges in _HUES.items():
        in_range = np.zeros_like(chromatic)
        for low, high in ranges:
            in_range |= (h >= low) & (h < high)
        names[chromatic & in_range] = COLOURS.index(name)
    names[chromatic & (v < 0.55) & ((h < 40) | (h >= 345))] = COLOURS.index("brown")
    names[~chromatic & (v > 0.8)] = COLOURS.index("white")
    names[v < 0.2] = COLOURS.index("black")
    return names.reshape(images.shape[:-1])


def colour_shares(images: np.ndarray, centre: float = 0.5) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, len(COLOURS)): the share of the central ``centre`` x
    ``centre`` region's pixels under each colour name (the object is centred in
    CIFAR-style photos)."""
    n, height, width = images.shape[:3]
    top, left = round(height * (1 - centre) / 2), round(width * (1 - centre) / 2)
    crop = images[:, top:height - top, left:width - left]
    names = colour_names(crop).reshape(n, -1)
    return np.stack([(names == i).mean(1) for i in range(len(COLOURS))], axis=1)


def dominant_colour(images: np.ndarray, centre: float = 0.5) -> np.ndarray:
    """The measured attribute label of each image: its most common central colour name."""
    return colour_shares(images, centre).argmax(1)


class ClipLike:
    """Image and text embeddings in one space; see the module docstring.

    >>> model = ClipLike()                                  # doctest: +SKIP
    >>> img = model.embed_images(images)                    # doctest: +SKIP
    >>> txt = model.embed_texts(["a photo of a red car"])   # doctest: +SKIP
    >>> (img @ txt.T)                                       # cosine similarities  # doctest: +SKIP
    """

    def __init__(self, preset: str = "book", image_model: str = "efficientnet-lite0", text_model: str = "minilm-l6",
                 temperature: float = 2.0, colour_weight: float = 0.5, image_size: int = 128):
        from . import models

        self.image_model, self.text_model_name = image_model, text_model
        self.image_net = models.load(image_model, preset=preset).model
        self.text_model = models.load(text_model, preset=preset).model  # a SentenceTransformer
        self.temperature, self.colour_weight, self.image_size = temperature, colour_weight, image_size
        classes = models.imagenet_classes()
        self.class_text = self._raw_texts([f"a photo of a {c}" for c in classes])
        self.mean = self.class_text.mean(0, keepdim=True)
        self.colour_text = self._raw_texts([f"a photo of something {c}" for c in COLOURS])
        self.colour_mean = self.colour_text.mean(0, keepdim=True)

    # ------------------------------------------------------------------ text side

    @torch.no_grad()
    def _raw_texts(self, texts: list[str]) -> torch.Tensor:
        return self.text_model.encode(texts, convert_to_tensor=True, normalize_embeddings=True,
                                      show_progress_bar=False).float().cpu()

    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        """Unit text embeddings in the joint space: MiniLM(text) − μ, normalised."""
        return torch.nn.functional.normalize(self._raw_texts(texts) - self.mean, dim=-1)

    @property
    def bert(self):
        return self.text_model[0].auto_model

    @property
    def tokenizer(self):
        return self.text_model.tokenizer

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.bert

    @property
    def dim(self) -> int:
        return self.class_text.shape[-1]

    def word_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (the words a prompt is made of)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def start_id(self) -> int:  # the tiny smoke-test encoder's byte tokenizer has only end-of-text
        tok = self.tokenizer
        return tok.cls_token_id if tok.cls_token_id is not None else tok.eos_token_id

    @property
    def end_id(self) -> int:
        tok = self.tokenizer
        return tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id

    def vocabulary(self) -> list[str]:
        """Every token of the text encoder's vocabulary, by id (for nearest-word readings)."""
        return self.tokenizer.convert_ids_to_tokens(list(range(self.bert.embeddings.word_embeddings.num_embeddings)))

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """MiniLM's input word embeddings for token ids (what learned context replaces)."""
        return self.bert.embeddings.word_embeddings(ids)

    def encode_embeddings(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Run MiniLM on input embeddings (differentiably) and return joint-space text
        embeddings: mean pooling and normalisation as the SentenceTransformer does, then
        − μ and normalise."""
        hidden = self.bert(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        sentence = torch.nn.functional.normalize(pooled, dim=-1)
        return torch.nn.functional.normalize(sentence - self.mean.to(sentence.device), dim=-1)

    # ------------------------------------------------------------------ image side

    @torch.no_grad()
    def image_logits(self, images: np.ndarray, batch: int = 64, progress: str | None = None) -> np.ndarray:
        """EfficientNet-Lite0 ImageNet logits at ``image_size`` px (TF-Lite normalisation)."""
        from tqdm.auto import tqdm

        from .models import efficientnet_input

        starts = range(0, len(images), batch)
        out = [self.image_net(efficientnet_input(images[i:i + batch], self.image_size))
               for i in tqdm(starts, desc=progress, disable=progress is None)]
        return torch.cat(out).numpy()

    def embed_image_parts(self, logits: np.ndarray, shares: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The object and colour parts of the image embedding (before weighting)."""
        p = torch.softmax(torch.as_tensor(logits) / self.temperature, dim=-1)
        objects = p @ (self.class_text - self.mean)
        colour = torch.as_tensor(shares, dtype=torch.float32) @ (self.colour_text - self.colour_mean)
        return objects, colour

    def embed_from_features(self, logits: np.ndarray, shares: np.ndarray,
                            colour_weight: float | None = None) -> torch.Tensor:
        objects, colour = self.embed_image_parts(logits, shares)
        weight = self.colour_weight if colour_weight is None else colour_weight
        return torch.nn.functional.normalize(objects + weight * colour, dim=-1)

    def embed_images(self, images: np.ndarray) -> torch.Tensor:
        return self.embed_features(self.image_features(images))

    # what a chapter caches: everything the image side needs, as one array per image
    def image_features(self, images: np.ndarray, progress: str | None = None) -> np.ndarray:
        """(N, 1000 + len(COLOURS)): ImageNet logits next to the measured colour shares."""
        return np.concatenate([self.image_logits(images, progress=progress), colour_shares(images)], axis=1).astype(np.float32)

    def embed_features(self, features: np.ndarray, colour_weight: float | None = None) -> torch.Tensor:
        n_logits = features.shape[1] - len(COLOURS)
        return self.embed_from_features(features[:, :n_logits], features[:, n_logits:], colour_weight)

    def describe(self) -> dict:
        return {"kind": "cliplike", "image_model": self.image_model, "text_model": self.text_model_name,
                "temperature": self.temperature, "colour_weight": self.colour_weight, "image_size": self.image_size}

    @property
    def feature_key(self) -> str:
        """What :meth:`image_features` depends on besides the images (a cache key part)."""
        return f"cliplike/{self.image_model}/{self.image_size}"


class OpenClip:
    """A real CLIP (open_clip) behind the same interface as :class:`ClipLike`, for the
    paper preset: text through open_clip's tokenizer and text transformer (pooled at
    the end-of-text token, as ``CLIP.encode_text`` does), images through its tower.

    The network computes on ``device`` (a value :func:`replbook.config.device` accepts);
    what it hands back (text and image embeddings) is on the host. Token embeddings and
    :meth:`encode_embeddings` stay on the device, for a prompt learner that trains there."""

    def __init__(self, name: str = "clip-vit-b-16", preset: str = "paper", device: str = "cpu"):
        from . import models
        from .config import run_device

        loaded = models.load(name, preset=preset)
        self.device = torch.device(run_device(device))
        self.net, (self.preprocess, self.tokenize) = loaded.model.to(self.device), loaded.tokenizer
        self.name = name
        self.net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.dim = int(self.net.text_projection.shape[-1])
        self.text_encoder = self.net  # frozen as a whole: the prompt learner trains only its own vectors

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> torch.Tensor:
        return self.net.encode_text(self.tokenize(texts).to(self.device), normalize=True).float().cpu()

    def word_ids(self, text: str) -> list[int]:
        ids = self.tokenize([text])[0].tolist()
        return ids[1:ids.index(self.end_id)]

    @property
    def start_id(self) -> int:
        return int(self.tokenize([""])[0, 0])

    @property
    def end_id(self) -> int:
        return int(self.tokenize([""])[0, 1])

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.net.token_embedding(ids.to(self.device))

    def encode_embeddings(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """open_clip's text transformer on input embeddings, pooled at the last real
        token (the end-of-text token the prompt learner puts there)."""
        net, (batch, length, _) = self.net, inputs_embeds.shape
        padded = torch.zeros(batch, net.context_length, inputs_embeds.shape[-1], dtype=inputs_embeds.dtype,
                             device=inputs_embeds.device)
        padded[:, :length] = inputs_embeds
        x = net.transformer(padded + net.positional_embedding, attn_mask=net.attn_mask)
        x = net.ln_final(x)[torch.arange(batch, device=x.device), (attention_mask.sum(1) - 1).to(x.device)]
        return torch.nn.functional.normalize(x @ net.text_projection, dim=-1)

    @torch.no_grad()
    def image_features(self, images: np.ndarray, progress: str | None = None, batch: int = 64) -> np.ndarray:
        from PIL import Image
        from tqdm.auto import tqdm

        out = []
        for i in tqdm(range(0, len(images), batch), desc=progress, disable=progress is None):
            pixels = torch.stack([self.preprocess(Image.fromarray(im)) for im in images[i:i + batch]])
            out.append(self.net.encode_image(pixels.to(self.device)).float().cpu())
        return torch.cat(out).numpy()

    def embed_features(self, features: np.ndarray) -> torch.Tensor:
        return torch.nn.functional.normalize(torch.as_tensor(features), dim=-1)

    def describe(self) -> dict:
        return {"kind": "open_clip", "model": self.name}

    @property
    def feature_key(self) -> str:
        # a GPU computes the features differently (to float rounding) from the CPU
        return f"open_clip/{self.name}" + ("" if self.device.type == "cpu" else f"@{self.device.type}")

    def vocabulary(self) -> list[str]:
        decoder = getattr(self.tokenize, "decoder", {})
        return [decoder.get(i, "").replace("</w>", "") for i in range(self.net.token_embedding.num_embeddings)]


def cached_features(model, images: np.ndarray, progress: str | None = None) -> np.ndarray:
    """``model.image_features(images)``, cached outside the repo (checksummed, rebuilt when
    damaged: :func:`replbook.paths.cached_torch`) under a hash of the images, the model's
    feature key and the code of this module (chapters 03 and 09)."""
    import hashlib
    import sys

    import torch

    from .paths import cached_torch, code_hash

    key = (hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
           + f" {images.shape} {model.feature_key} {code_hash(sys.modules[__name__])}")
    features, _ = cached_torch("clip-features", key,
                               lambda: torch.as_tensor(model.image_features(images, progress=progress)))
    return features.numpy()


CLIPS = ("cliplike", "clip-vit-b-16", "tiny-open-clip")


def load(name: str = "cliplike", preset: str = "book", image_model: str = "efficientnet-lite0",
         text_model: str = "minilm-l6", temperature: float = 2.0, colour_weight: float = 0.5, image_size: int = 128,
         device: str = "cpu"):
    """The joint image-text model a chapter names: the offline CLIP-like model (on the
    CPU), or a real CLIP through open_clip (``clip-vit-b-16``; ``tiny-open-clip`` in the
    tests) on ``device``."""
    if name == "cliplike":
        return ClipLike(preset, image_model, text_model, temperature=temperature, colour_weight=colour_weight,
                        image_size=image_size)
    if name in CLIPS:
        return OpenClip(name, preset=preset, device=device)
    raise ValueError(f"clip={name!r}; choose one of: {', '.join(CLIPS)}")
