"""IntCoOp (Ghosal et al., EMNLP 2024, arXiv 2406.13683) and CoOp (Zhou et al., 2022):
prompt tuning on chapter 03's CLIP-like model (:mod:`replbook.cliplike`).

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
measured attribute) + λ_reg · ‖T([v, attr, CLASS]) − T("a photo of a {attr} {CLASS}")‖²
(KgCoOp-style, toward the hand-written attribute prompt).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .cliplike import ClipLike


class PromptLearner(nn.Module):
    """Learned context vectors and the fixed token embeddings of classes and attributes."""

    def __init__(self, model: ClipLike, class_names: list[str], attributes: list[str] = (),
                 init: str = "a photo of a"):
        super().__init__()
        self.model = model
        for p in model.bert.parameters():
            p.requires_grad_(False)
        tok = model.tokenizer
        ids = tok(init, add_special_tokens=False)["input_ids"]
        self.context = nn.Parameter(model.token_embeddings(torch.tensor(ids)).detach().clone())
        words = lambda text: model.token_embeddings(torch.tensor(tok(text, add_special_tokens=False)["input_ids"])).detach()
        self.class_tokens = [words(name) for name in class_names]
        self.attribute_tokens = [words(a) for a in attributes]
        self.cls = model.token_embeddings(torch.tensor([tok.cls_token_id])).detach()
        self.sep = model.token_embeddings(torch.tensor([tok.sep_token_id])).detach()

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
        embeds = torch.zeros(len(sequences), length, self.cls.shape[-1])
        mask = torch.zeros(len(sequences), length, dtype=torch.long)
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


class IntCoOp(nn.Module):
    """CoOp plus an image-predicted attribute token, its supervision and the
    hand-prompt regulariser (see the module docstring)."""

    def __init__(self, model: ClipLike, class_names: list[str], attributes: list[str], scale: float = 30.0,
                 attribute_weight: float = 1.0, regularizer_weight: float = 8.0):
        super().__init__()
        self.prompts = PromptLearner(model, class_names, attributes)
        self.attribute_head = nn.Linear(model.class_text.shape[-1], len(attributes))
        self.scale, self.attribute_weight, self.regularizer_weight = scale, attribute_weight, regularizer_weight
        self.class_names, self.attributes, self.model = class_names, attributes, model
        self._hand: dict[tuple[int, ...], torch.Tensor] = {}

    def attribute_probs(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.attribute_head(images), dim=-1)

    def _per_attribute(self, classes: list[int]) -> torch.Tensor:  # K x C x d
        return torch.stack([self.prompts.features(classes, k) for k in range(len(self.attributes))])

    def logits(self, images: torch.Tensor, classes: list[int]) -> torch.Tensor:
        return self._logits(images, self._per_attribute(classes))

    def _logits(self, images, per_attribute):
        mixed = torch.einsum("nk,kcd->ncd", self.attribute_probs(images), per_attribute)
        return self.scale * torch.einsum("nd,ncd->nc", images, nn.functional.normalize(mixed, dim=-1))

    def hand_prompts(self, classes: list[int]) -> torch.Tensor:  # K x C x d, "a photo of a {attr} {class}"
        key = tuple(classes)
        if key not in self._hand:
            self._hand[key] = torch.stack([self.model.embed_texts([f"a photo of a {a} {self.class_names[c]}" for c in classes])
                                           for a in self.attributes])
        return self._hand[key]

    def loss(self, images, labels, classes, attributes):
        per_attribute = self._per_attribute(classes)
        task = nn.functional.cross_entropy(self._logits(images, per_attribute), labels)
        attribute = nn.functional.cross_entropy(self.attribute_head(images), attributes)
        regularizer = ((per_attribute - self.hand_prompts(classes)) ** 2).sum(-1).mean()
        return task + self.attribute_weight * attribute + self.regularizer_weight * regularizer


METHODS = {"coop": CoOp, "intcoop": IntCoOp}


@dataclass
class FewShot:
    """Image embeddings (joint space), class labels and measured attribute labels."""

    images: torch.Tensor
    labels: np.ndarray
    attributes: np.ndarray


def train(method: nn.Module, data: FewShot, classes: list[int], steps: int, lr: float, seed: int,
          progress: str | None = None) -> list[float]:
    """Full-batch Adam on the few-shot set, labels re-indexed into ``classes``."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    index = {c: i for i, c in enumerate(classes)}
    labels = torch.tensor([index[int(c)] for c in data.labels])
    attributes = torch.as_tensor(data.attributes)
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in tqdm(range(steps), desc=progress, disable=progress is None):
        loss = method.loss(data.images, labels, classes, attributes)
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
    predicted = method.logits(data.images[keep], classes).argmax(1).numpy()
    return float((predicted == np.array([index[int(c)] for c in data.labels[keep]])).mean())


def harmonic_mean(base: float, novel: float) -> float:
    """The base-to-novel summary of CoOp/CoCoOp/IntCoOp: 2·b·n / (b + n)."""
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)
