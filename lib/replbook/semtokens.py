"""Semantically meaningful visual tokens (Kalibhat et al., 2024, arXiv 2405.16401; no
official code found).

The paper replaces a ViT's uniform patches by *tangible* tokens (one per instance
segmentation mask) and *intangible* tokens (one per relation from a scene-graph model),
lets a transformer encode them with **additive attention weights** that encode their
structure, and trains it contrastively against caption embeddings. The token
featurization and the additive-weight formula are not published in a form we could
verify; the ones here are our design (chapter 10 says so):

- scenes (:func:`make_scenes`): two objects with a colour, shape, size and texture in a
  spatial relation, rendered at 64 px; the caption comes from the scene graph; some
  colour–shape combinations never occur in training;
- tangible tokens (:func:`tangible_features`): the object's masked crop (RGB + mask,
  16×16) and its box geometry, from the oracle masks or from a simple segmenter
  (:func:`segment`: background distance, closing, connected components);
- intangible tokens: the canonical predicate ("left of" / "above") of every pair of
  instances and the geometry of their union box — from the scene graph (oracle) or from
  a geometric rule on the segmenter's masks (our stand-in for a scene-graph model);
- additive attention weights (:class:`StructureBias`): a learned scalar per head for
  each structural type of a query–key pair (relation → its subject, relation → its
  object, subject → relation, ...), added to the attention logits;
- the encoders (:class:`TokenEncoder`, :class:`PatchEncoder`) share one transformer
  (:class:`Backbone`), so the patch ViT has the same size and training budget;
- the text side: MiniLM frozen; a learned head — one transformer layer with learned
  positions over its token states, then a few learned attention-pooling queries and a
  linear map (:class:`TextProjection`) — so word order can be learned;
- training (:func:`train`): the symmetric contrastive loss with hard negatives (each
  image's relation- and attribute-swapped captions, NegCLIP-style) for every encoder
  alike, each trained to a plateau of its validation loss by one rule;
- at paper scale (COCO, ViT-B-sized encoders) on a GPU (``device``): the encoders and
  Mask R-CNN compute there, every split stays in host memory and goes there a batch at a
  time, and each transformer block recomputes its activations in the backward pass
  (``checkpoint_blocks``) — memory settings only; the book runs on the CPU.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .images import to_tensor

# ----------------------------------------------------------------------------- scenes

COLOURS = {"red": (215, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215), "yellow": (230, 200, 30),
           "purple": (140, 60, 180), "orange": (240, 130, 20)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = {"small": 6, "large": 10}  # half-extent in pixels
TEXTURES = ("solid", "striped")
# the caption's phrasings of the two canonical predicates; the scene graph stores only
# the canonical one (subject left of / above object), the caption picks a phrasing
PHRASES = {"left of": ("to the left of", "to the right of"), "above": ("above", "below")}
PREDICATES = tuple(PHRASES)
# colour–shape pairs that never occur in training (each colour and shape at most once)
HELD_OUT = (("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square"))
IMAGE_SIZE = 64


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    texture: str
    x: float  # centre, pixels
    y: float

    def words(self) -> str:
        return f"{self.size} {self.colour} {self.texture} {self.shape}"

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT


@dataclass(frozen=True)
class Scene:
    """Two objects and their relation. ``predicate`` is canonical: ``objects[0]`` is left
    of / above ``objects[1]``; ``flipped`` says whether the caption names ``objects[1]``
    first (with the inverse phrase), so that captions use all four phrasings."""

    objects: tuple[Obj, Obj]
    predicate: str
    flipped: bool
    background: tuple[int, int, int]
    seed: int

    @property
    def caption(self) -> str:
        return caption_of(self.objects, self.predicate, self.flipped)

    @property
    def relation_swapped(self) -> str:
        """The ARO-style negative: subject and object exchanged, the phrase kept."""
        a, b = self.objects
        return caption_of((b, a), self.predicate, self.flipped)

    @property
    def attribute_swapped(self) -> str:
        """The ARO-style negative: the two objects' colours exchanged (scenes always
        have two different colours)."""
        a, b = self.objects
        return caption_of((_replace(a, colour=b.colour), _replace(b, colour=a.colour)), self.predicate, self.flipped)

    def mirrored(self) -> "Scene":
        """The same two objects with their places exchanged: the relation-swapped
        caption is true of it (the other image of a Winoground-style pair)."""
        a, b = self.objects
        return Scene((_replace(b, x=a.x, y=a.y), _replace(a, x=b.x, y=b.y)), self.predicate, self.flipped,
                     self.background, self.seed + 1)

    @property
    def held_out(self) -> bool:
        return any(o.held_out for o in self.objects)


def _replace(obj: Obj, **changes) -> Obj:
    from dataclasses import replace

    return replace(obj, **changes)


def caption_of(objects: tuple[Obj, Obj], predicate: str, flipped: bool) -> str:
    a, b = objects
    if flipped:
        return f"a {b.words()} {PHRASES[predicate][1]} a {a.words()}"
    return f"a {a.words()} {PHRASES[predicate][0]} a {b.words()}"


def random_scene(rng: np.random.Generator, held_out: bool | None, seed: int) -> Scene:
    """One scene; ``held_out``: True = at least one object has a held-out colour–shape
    pair, False = none has, None = either."""
    colours = list(COLOURS)
    while True:
        objs = []
        for _ in range(2):
            objs.append((colours[rng.integers(len(colours))], SHAPES[rng.integers(len(SHAPES))],
                         list(SIZES)[rng.integers(2)], TEXTURES[rng.integers(2)]))
        if objs[0][0] == objs[1][0]:
            continue
        novel = any((c, s) in HELD_OUT for c, s, *_ in objs)
        if held_out is None or novel == held_out:
            break
    predicate = PREDICATES[rng.integers(2)]
    # the relation's axis gets a clear gap, the other axis a small jitter
    margin = 12
    along = rng.uniform(margin, IMAGE_SIZE / 2 - 7), rng.uniform(IMAGE_SIZE / 2 + 7, IMAGE_SIZE - margin)
    across = rng.uniform(margin + 4, IMAGE_SIZE - margin - 4)
    jitter = rng.uniform(-4, 4, 2)
    places = [(along[i], across + jitter[i]) for i in range(2)]
    if predicate == "above":
        places = [(y, x) for x, y in places]
    background = tuple(int(v) for v in rng.integers(200, 246, 3))
    objects = tuple(Obj(*attrs, x=float(p[0]), y=float(p[1])) for attrs, p in zip(objs, places))
    return Scene(objects, predicate, bool(rng.integers(2)), background, seed)


def make_scenes(n: int, held_out: bool | None, seed: int) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [random_scene(rng, held_out, seed * 1_000_003 + i) for i in range(n)]


def _shape_mask(shape: str, half: int, cx: float, cy: float) -> np.ndarray:
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= half ** 2
    if shape == "square":
        return (np.abs(dx) <= half * 0.85) & (np.abs(dy) <= half * 0.85)
    if shape == "triangle":  # apex up
        return (dy <= half * 0.8) & (dy >= -half) & (np.abs(dx) <= (dy + half) * 0.58)
    if shape == "cross":
        arm = half * 0.38
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= half)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= half))
    raise ValueError(f"shape={shape!r}: choose from {SHAPES}")


def render(scene: Scene) -> tuple[np.ndarray, np.ndarray]:
    """The image (H, W, 3 uint8) and the oracle instance map (H, W int: 0 background,
    i + 1 object i's visible pixels; the second object is drawn on top)."""
    rng = np.random.default_rng(scene.seed)
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), np.float64)
    image[:] = scene.background
    image += rng.normal(0, 6, image.shape)
    instances = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.int64)
    rows = np.arange(IMAGE_SIZE)[:, None]
    for i, obj in enumerate(scene.objects):
        mask = _shape_mask(obj.shape, SIZES[obj.size], obj.x, obj.y)
        colour = np.array(COLOURS[obj.colour], np.float64)
        paint = np.broadcast_to(colour, image.shape).copy()
        if obj.texture == "striped":  # dark diagonal stripes, 2 of every 4 pixels
            stripes = ((rows + np.arange(IMAGE_SIZE)[None, :]) // 2) % 2 == 0
            paint[stripes] = colour * 0.45
        image[mask] = paint[mask] + rng.normal(0, 4, (mask.sum(), 3))
        instances[mask] = i + 1
    return np.clip(image, 0, 255).round().astype(np.uint8), instances


def render_all(scenes: list[Scene]) -> tuple[np.ndarray, np.ndarray]:
    pairs = [render(s) for s in scenes]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


# ----------------------------------------------------------------------------- segmenter


def segment(image: np.ndarray, threshold: float = 40.0, min_pixels: int = 12, max_instances: int = 4) -> np.ndarray:
    """A simple instance segmenter (scikit-image): pixels farther than ``threshold`` (RGB
    distance) from the background colour (the median of the image's border), closed
    with a 3×3 square, split into 8-connected components; components under
    ``min_pixels`` dropped, at most ``max_instances`` kept (the largest), labelled
    1, 2, ... from left to right. Touching objects merge into one instance — the
    segmenter's typical error here."""
    from skimage import measure, morphology

    img = image.astype(np.float64)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = np.median(border, axis=0)
    foreground = np.linalg.norm(img - background, axis=-1) > threshold
    foreground = morphology.closing(foreground, np.ones((3, 3), bool))
    labels = measure.label(foreground, connectivity=2)
    regions = [r for r in measure.regionprops(labels) if r.area >= min_pixels]
    regions = sorted(regions, key=lambda r: -r.area)[:max_instances]
    regions = sorted(regions, key=lambda r: r.centroid[1])
    out = np.zeros(labels.shape, np.int64)
    for k, r in enumerate(regions):
        out[labels == r.label] = k + 1
    return out


def segment_all(images: np.ndarray, **kwargs) -> np.ndarray:
    return np.stack([segment(im, **kwargs) for im in images])


def segmentation_quality(found: np.ndarray, oracle: np.ndarray) -> dict[str, float]:
    """How the segmenter's instances compare with the oracle's: the share of images with
    the right instance count, and the mean IoU of each oracle instance with its best
    match."""
    right_count, ious = [], []
    for f, o in zip(found, oracle):
        right_count.append(f.max() == o.max())
        for k in range(1, o.max() + 1):
            target = o == k
            best = max([((f == j) & target).sum() / ((f == j) | target).sum() for j in range(1, f.max() + 1)] or [0.0])
            ious.append(best)
    return {"right instance count": float(np.mean(right_count)), "mean best IoU": float(np.mean(ious))}


# ----------------------------------------------------------------------------- tokens

CROP = 16  # tangible tokens see their instance at CROP × CROP pixels
GEOMETRY = 5  # centre x, centre y, width, height, sqrt(area) — all / image size
RELATION_FEATURES = len(PREDICATES) + 4  # one-hot predicate + union box (centre, size)


@dataclass
class Tokens:
    """The semantic tokens of a set of images, padded to ``max_instances`` tangible and
    ``max_relations`` intangible tokens.

    crops: (N, T, 4, CROP, CROP) masked RGB + mask in [0, 1]; geometry: (N, T, GEOMETRY);
    tangible_valid: (N, T); relations: (N, R, RELATION_FEATURES); subject, object: (N, R)
    indices of the tangible tokens each relation links; relation_valid: (N, R)."""

    crops: torch.Tensor
    geometry: torch.Tensor
    tangible_valid: torch.Tensor
    relations: torch.Tensor
    subject: torch.Tensor
    object: torch.Tensor
    relation_valid: torch.Tensor

    def __len__(self) -> int:
        return len(self.crops)

    def __getitem__(self, index) -> "Tokens":
        return Tokens(*(getattr(self, f)[index] for f in self.__dataclass_fields__))

    def to(self, device) -> "Tokens":
        return Tokens(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))

    @property
    def device(self) -> torch.device:
        return self.crops.device


def _boxes(instances: np.ndarray) -> tuple[list[int], list[tuple[float, float, float, float, float]]]:
    """The labels present in an instance map (1, 2, ...; a label may be empty when a
    segmenter's later mask covered it) and their boxes (x0, y0, x1, y1, area), in pixels."""
    labels, boxes = [], []
    for k in range(1, instances.max() + 1):
        ys, xs = np.nonzero(instances == k)
        if len(xs):
            labels.append(k)
            boxes.append((xs.min(), ys.min(), xs.max() + 1.0, ys.max() + 1.0, float(len(xs))))
    return labels, boxes


def canonical_relation(box_a, box_b) -> tuple[str, bool]:
    """Our stand-in for a scene-graph model's relation between two instances: the axis on
    which their centres differ more gives the predicate; returns (predicate, whether
    ``a`` is its subject, i.e. left of / above ``b``)."""
    ax, ay = (box_a[0] + box_a[2]) / 2, (box_a[1] + box_a[3]) / 2
    bx, by = (box_b[0] + box_b[2]) / 2, (box_b[1] + box_b[3]) / 2
    if abs(ax - bx) >= abs(ay - by):
        return "left of", ax < bx
    return "above", ay < by


def build_tokens(images: np.ndarray, instances: np.ndarray, scene_graphs: list[tuple[str, int, int]] | None = None,
                 max_instances: int = 4) -> Tokens:
    """Tangible tokens from the instance maps; intangible tokens for every pair of
    instances, from ``scene_graphs`` (one (predicate, subject, object) per image — the
    oracle) or, when None, from :func:`canonical_relation` on the instances' boxes."""
    from itertools import combinations

    from torchvision.ops import roi_align

    n, size = len(images), images.shape[1]
    max_relations = max_instances * (max_instances - 1) // 2
    crops = torch.zeros(n, max_instances, 4, CROP, CROP)
    geometry = torch.zeros(n, max_instances, GEOMETRY)
    tangible_valid = torch.zeros(n, max_instances, dtype=torch.bool)
    relations = torch.zeros(n, max_relations, RELATION_FEATURES)
    subject = torch.zeros(n, max_relations, dtype=torch.long)
    obj = torch.zeros(n, max_relations, dtype=torch.long)
    relation_valid = torch.zeros(n, max_relations, dtype=torch.bool)
    pixels = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
    for i in range(n):
        labels, boxes = _boxes(instances[i])
        labels, boxes = labels[:max_instances], boxes[:max_instances]
        if not boxes:
            continue
        masks = torch.stack([torch.as_tensor(instances[i] == k) for k in labels]).float()[:, None]
        stacked = torch.cat([pixels[i:i + 1] * masks, masks], 1)  # (k, 4, H, W)
        rois = torch.tensor([[k, *b[:4]] for k, b in enumerate(boxes)], dtype=torch.float32)
        crops[i, :len(boxes)] = roi_align(stacked, rois, CROP, aligned=True)
        for k, (x0, y0, x1, y1, area) in enumerate(boxes):
            geometry[i, k] = torch.tensor([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0, np.sqrt(area)]) / size
        tangible_valid[i, :len(boxes)] = True
        if scene_graphs is not None:
            predicate, s, o = scene_graphs[i]
            pairs = [(predicate, s, o)] if max(s, o) < len(boxes) else []
        else:
            pairs = []
            for a, b in combinations(range(len(boxes)), 2):
                predicate, a_first = canonical_relation(boxes[a], boxes[b])
                pairs.append((predicate, a, b) if a_first else (predicate, b, a))
        for r, (predicate, s, o) in enumerate(pairs):
            x0 = min(boxes[s][0], boxes[o][0]); y0 = min(boxes[s][1], boxes[o][1])
            x1 = max(boxes[s][2], boxes[o][2]); y1 = max(boxes[s][3], boxes[o][3])
            onehot = [float(predicate == p) for p in PREDICATES]
            relations[i, r] = torch.tensor(onehot + [(x0 + x1) / 2 / size, (y0 + y1) / 2 / size,
                                                     (x1 - x0) / size, (y1 - y0) / size])
            subject[i, r], obj[i, r], relation_valid[i, r] = s, o, True
    return Tokens(crops, geometry, tangible_valid, relations, subject, obj, relation_valid)


def oracle_graphs(scenes: list[Scene]) -> list[tuple[str, int, int]]:
    """The scene graph's relation per scene, as (predicate, subject, object) over the
    oracle instances (object i is instance i + 1)."""
    return [(s.predicate, 0, 1) for s in scenes]


# ----------------------------------------------------------------------------- encoders

# the structural type of a (query, key) pair of tokens; each gets a learned additive
# attention weight per head (our design of the paper's "additive attention weights")
PAIR_TYPES = ("self", "cls → token", "token → cls", "tangible ↔ tangible", "relation → subject",
              "relation → object", "subject → relation", "object → relation", "relation ↔ other tangible",
              "relation ↔ relation")


def pair_types(tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L, L) pair-type indices into :data:`PAIR_TYPES` for the sequence
    [CLS, tangible × T, relation × R], and the (N, L) validity of each position."""
    n, t = tokens.tangible_valid.shape
    r = tokens.relation_valid.shape[1]
    length = 1 + t + r
    device = tokens.tangible_valid.device
    types = torch.full((n, length, length), PAIR_TYPES.index("relation ↔ relation"), dtype=torch.long, device=device)
    tang = slice(1, 1 + t)
    rel = slice(1 + t, length)
    types[:, tang, tang] = PAIR_TYPES.index("tangible ↔ tangible")
    types[:, rel, tang] = PAIR_TYPES.index("relation ↔ other tangible")
    types[:, tang, rel] = PAIR_TYPES.index("relation ↔ other tangible")
    rows = torch.arange(n, device=device)[:, None].expand(n, r)
    rel_pos = (1 + t + torch.arange(r, device=device))[None].expand(n, r)
    types[rows, rel_pos, 1 + tokens.subject] = PAIR_TYPES.index("relation → subject")
    types[rows, rel_pos, 1 + tokens.object] = PAIR_TYPES.index("relation → object")
    types[rows, 1 + tokens.subject, rel_pos] = PAIR_TYPES.index("subject → relation")
    types[rows, 1 + tokens.object, rel_pos] = PAIR_TYPES.index("object → relation")
    types[:, 0, :] = PAIR_TYPES.index("cls → token")
    types[:, :, 0] = PAIR_TYPES.index("token → cls")
    diagonal = torch.arange(length, device=device)
    types[:, diagonal, diagonal] = PAIR_TYPES.index("self")
    valid = torch.cat([torch.ones(n, 1, dtype=torch.bool, device=device), tokens.tangible_valid,
                       tokens.relation_valid], 1)
    return types, valid


class Backbone(nn.Module):
    """The transformer both encoders share: pre-LN blocks (torch's
    ``TransformerEncoderLayer``), an additive float attention mask per head, and the
    class token's final state projected into the joint space.

    ``checkpoint_blocks``: while training, keep only each block's input for the backward
    pass and recompute the block's inside there (activation checkpointing, Chen et al.
    2016): the same outputs and gradients for about a third more compute, and the
    activations of one block instead of all (chapter 10's paper preset: ViT-B at batch 512
    would otherwise keep ~92 GB)."""

    def __init__(self, width: int, depth: int, heads: int, embed_dim: int, checkpoint_blocks: bool = False):
        super().__init__()
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, embed_dim)
        self.heads = heads
        self.cls = nn.Parameter(torch.randn(width) * 0.02)
        self.checkpoint_blocks = checkpoint_blocks

    def forward(self, tokens: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (N, L, width) with the class token's slot first; bias (N, heads, L, L)
        added to the attention logits (a large negative value masks padding)."""
        mask = None if bias is None else bias.flatten(0, 1)
        with _ordinary_attention():
            if self.checkpoint_blocks and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                x = tokens
                for block in self.blocks.layers:  # what nn.TransformerEncoder does, one block at a time
                    x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = self.blocks(tokens, mask=mask)
        return self.head(self.norm(x[:, 0]))


@contextmanager
def _ordinary_attention():
    """torch's fused inference path ("fast path") returned NaN with a learned per-head
    float mask (torch 2.x, CPU) and skips padded positions in evaluation only; the
    ordinary path gives the training-mode outputs."""
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


class PatchEncoder(nn.Module):
    """The ViT baseline: non-overlapping ``patch``-px patches, learned positions."""

    def __init__(self, width: int, depth: int, heads: int, embed_dim: int, patch: int = 8,
                 image_size: int = IMAGE_SIZE, checkpoint_blocks: bool = False):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"patch={patch} must divide image_size={image_size}")
        self.patchify = nn.Conv2d(3, width, patch, stride=patch)
        self.position = nn.Parameter(torch.randn((image_size // patch) ** 2 + 1, width) * 0.02)
        self.backbone = Backbone(width, depth, heads, embed_dim, checkpoint_blocks)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patchify(pixels).flatten(2).transpose(1, 2)
        x = torch.cat([self.backbone.cls.expand(len(x), 1, -1), x], 1) + self.position
        return self.backbone(x)


class StructureBias(nn.Module):
    """Additive attention weights: a scalar per head for each pair type (zero-initialised;
    frozen at zero when ``learned`` is False — the ablation), a large negative number
    where the key is padding."""

    def __init__(self, heads: int, learned: bool = True):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(len(PAIR_TYPES), heads), requires_grad=learned)

    def forward(self, types: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # F.embedding is the lookup self.table[types] with a deterministic backward: indexing's
        # backward adds each pair's gradient into the table in a thread-dependent order, and
        # two trainings from one seed drifted apart (Deviations, chapter 10)
        bias = nn.functional.embedding(types, self.table).permute(0, 3, 1, 2)  # (N, heads, L, L)
        return bias.masked_fill(~valid[:, None, None, :], -1e4)


class TokenEncoder(nn.Module):
    """The semantic-token encoder: [CLS, tangible tokens, intangible tokens] through the
    shared backbone with additive structural attention weights.

    ``intangible=False`` drops the relation tokens; ``additive=False`` freezes the
    additive weights at zero (padding is still masked)."""

    def __init__(self, width: int, depth: int, heads: int, embed_dim: int, intangible: bool = True,
                 additive: bool = True, checkpoint_blocks: bool = False):
        super().__init__()
        self.appearance = nn.Linear(4 * CROP * CROP, width)
        self.geometry = nn.Linear(GEOMETRY, width)
        self.relation = nn.Linear(RELATION_FEATURES, width)
        self.kind = nn.Parameter(torch.randn(2, width) * 0.02)  # tangible, intangible
        self.bias = StructureBias(heads, learned=additive)
        self.backbone = Backbone(width, depth, heads, embed_dim, checkpoint_blocks)
        self.intangible = intangible

    def sequence(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedded token sequence [CLS, tangible, intangible] and its attention bias."""
        if not self.intangible:
            tokens = Tokens(tokens.crops, tokens.geometry, tokens.tangible_valid, tokens.relations[:, :0],
                            tokens.subject[:, :0], tokens.object[:, :0], tokens.relation_valid[:, :0])
        n = len(tokens)
        tangible = self.appearance(tokens.crops.flatten(2)) + self.geometry(tokens.geometry) + self.kind[0]
        relation = self.relation(tokens.relations) + self.kind[1]
        x = torch.cat([self.backbone.cls.expand(n, 1, -1), tangible, relation], 1)
        types, valid = pair_types(tokens)
        return x, self.bias(types, valid)

    def forward(self, tokens: Tokens) -> torch.Tensor:
        return self.backbone(*self.sequence(tokens))


class TextProjection(nn.Module):
    """The text side's learned part on top of the frozen MiniLM (its last-layer token
    states, precomputed): ``layers`` transformer layers of width ``width`` over the
    states mapped down to that width, with learned positions, so the text side can learn
    which word belongs to which object and in what order; then ``queries`` learned
    attention-pooling queries, their pooled vectors concatenated and mapped linearly into
    the joint space. ``layers=0`` pools MiniLM's states directly (with one query and
    uniform weights that is MiniLM's own mean pooling, under which a caption and its
    relation swap have cosine ≈ 0.99)."""

    def __init__(self, text_dim: int, embed_dim: int, queries: int = 4, layers: int = 0, width: int = 64,
                 heads: int = 4, length: int = 24):
        super().__init__()
        dim = width if layers else text_dim
        self.blocks = None
        if layers:
            self.down = nn.Linear(text_dim, width)
            self.position = nn.Parameter(torch.randn(length, width) * 0.02)
            layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(width)
        self.queries = nn.Parameter(torch.randn(queries, dim) * dim ** -0.5)
        self.linear = nn.Linear(queries * dim, embed_dim)

    def forward(self, text: "TextStates") -> torch.Tensor:
        states = text.states.float()
        if self.blocks is not None:
            x = self.down(states) + self.position[:states.shape[1]]
            with _ordinary_attention():
                x = self.blocks(x, src_key_padding_mask=~text.mask)
            states = self.norm(x)
        scores = torch.einsum("nld,qd->nql", states, self.queries)
        scores = scores.masked_fill(~text.mask[:, None, :], -1e4)
        pooled = torch.einsum("nql,nld->nqd", scores.softmax(-1), states)
        return self.linear(pooled.flatten(1))


@dataclass
class TextStates:
    """Frozen MiniLM token states of captions (N, L, 384, float16) and their mask (N, L)."""

    states: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, index) -> "TextStates":
        return TextStates(self.states[index], self.mask[index])

    def to(self, device) -> "TextStates":
        return TextStates(self.states.to(device), self.mask.to(device))

    @property
    def device(self) -> torch.device:
        return self.states.device


@torch.no_grad()
def text_states(encoder, captions: list[str], length: int = 24, batch: int = 128) -> TextStates:
    """MiniLM's last-layer token states for each caption (a SentenceTransformer's first
    module), cut to ``length`` tokens; batches of similar length, padded only within
    the batch (the attention mask keeps padding out of the states)."""
    transformer = encoder[0]
    transformer.auto_model.eval()  # no dropout
    tokens = transformer.tokenizer(captions, truncation=True, max_length=length)["input_ids"]
    order = np.argsort([len(t) for t in tokens], kind="stable")
    states = torch.zeros(len(captions), length, transformer.auto_model.config.hidden_size, dtype=torch.float16)
    mask = torch.zeros(len(captions), length, dtype=torch.bool)
    for start in range(0, len(order), batch):
        rows = torch.as_tensor(order[start:start + batch])
        features = transformer.tokenizer([captions[i] for i in rows.tolist()], padding="longest", truncation=True,
                                         max_length=length, return_tensors="pt")
        out = transformer.auto_model(**features).last_hidden_state
        states[rows, :out.shape[1]] = out.half()
        mask[rows, :out.shape[1]] = features["attention_mask"].bool()
    return TextStates(states, mask)


# ----------------------------------------------------------------------------- training


class DualEncoder(nn.Module):
    """An image encoder (patches or semantic tokens) and the text projection, trained with
    the symmetric contrastive (CLIP) loss and a learned temperature."""

    def __init__(self, image_encoder: nn.Module, text_dim: int, embed_dim: int, queries: int = 4,
                 text_layers: int = 0, text_width: int = 64):
        super().__init__()
        self.image = image_encoder
        self.text = TextProjection(text_dim, embed_dim, queries, text_layers, text_width)
        self.logit_scale = nn.Parameter(torch.tensor(np.log(1 / 0.07), dtype=torch.float32))

    def embed_images(self, inputs) -> torch.Tensor:
        return nn.functional.normalize(self.image(inputs), dim=-1)

    def embed_texts(self, sentences: TextStates) -> torch.Tensor:
        return nn.functional.normalize(self.text(sentences), dim=-1)

    def loss(self, inputs, sentences: TextStates, negatives: "list[TextStates] | tuple" = ()) -> torch.Tensor:
        """Symmetric InfoNCE over the batch (CLIP: the mean of the image → text and the
        text → image cross-entropies); each entry of ``negatives`` (one wrong caption per
        image of the batch, e.g. its relation swap) joins the image → text side as extra
        wrong captions for every image (NegCLIP-style hard negatives, Yuksekgonul et al.
        2023)."""
        images, texts = self.embed_images(inputs), self.embed_texts(sentences)
        scale = self.logit_scale.exp().clamp(max=100)
        logits = scale * images @ texts.T
        labels = torch.arange(len(logits), device=logits.device)
        image_to_text = torch.cat([logits, *(scale * images @ self.embed_texts(n).T for n in negatives)], 1)
        return (nn.functional.cross_entropy(image_to_text, labels) + nn.functional.cross_entropy(logits.T, labels)) / 2


def _take(inputs, index):
    return inputs[index] if isinstance(inputs, (Tokens, TextStates)) else inputs[torch.as_tensor(index)]


ADDITIVE_LR = 10.0  # learning-rate multiplier of the additive attention weights


@dataclass
class TrainingSet:
    """What an encoder trains or validates on: its image inputs, the caption states and
    one swapped caption per image for each hard-negative kind."""

    inputs: object
    captions: TextStates
    negatives: dict[str, TextStates] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)

    def batch(self, index, device="cpu") -> tuple:
        """The pairs at ``index``, sent to ``device`` (the whole set stays on the host)."""
        return (_take(self.inputs, index).to(device), self.captions[index].to(device),
                [n[index].to(device) for n in self.negatives.values()])


def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` computes: the device of its first parameter."""
    return next(model.parameters()).device


@torch.no_grad()
def validation_loss(model: DualEncoder, data: TrainingSet, batch: int) -> float:
    """The training loss on held-aside pairs, in fixed consecutive batches of ``batch``
    (the in-batch negatives are the same every epoch), weighted by batch size."""
    model.eval()
    device = model_device(model)
    total = 0.0
    for start in range(0, len(data), batch):
        index = np.arange(start, min(start + batch, len(data)))
        total += float(model.loss(*data.batch(index, device))) * len(index)
    return total / len(data)


def train(model: DualEncoder, data: TrainingSet, validation: TrainingSet, lr: float, batch: int, seed: int,
          max_epochs: int, patience: int, progress: str | None = None) -> dict:
    """Train to a plateau of the validation loss, one rule for every encoder: AdamW, the
    rate warmed up linearly over the first epoch, then halved whenever an epoch does not
    improve the best validation loss (by more than ``MIN_IMPROVEMENT``); training stops
    after ``patience`` epochs in a row without improvement (or at ``max_epochs``) and the
    weights of the best epoch are kept. Returns the training and validation loss per
    epoch, the best epoch and whether the cap stopped it."""
    import copy

    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    # weight decay on matrices only; the additive attention weights are a few scalars that
    # must grow to several units to change attention, so they get ten times the rate
    groups = {"decay": [], "plain": [], "additive": []}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups["additive" if name.endswith("bias.table") else "decay" if p.ndim >= 2 else "plain"].append(p)
    optimizer = torch.optim.AdamW([{"params": groups["decay"], "weight_decay": 0.05, "lr": lr},
                                   {"params": groups["plain"], "weight_decay": 0.0, "lr": lr},
                                   {"params": groups["additive"], "weight_decay": 0.0, "lr": lr * ADDITIVE_LR}])
    base = [g["lr"] for g in optimizer.param_groups]
    device = model_device(model)  # each batch goes there; the training set stays on the host
    steps_per_epoch = len(data) // batch
    if steps_per_epoch < 1:
        raise ValueError(f"batch={batch} is larger than the {len(data)} training pairs")
    losses, validation_losses = [], []
    best, best_state, best_epoch, waited, scale, step = float("inf"), None, 0, 0, 1.0, 0
    bar = tqdm(range(max_epochs), desc=progress, disable=progress is None, leave=False)
    for epoch in bar:
        model.train()
        order = rng.permutation(len(data))
        epoch_losses = []
        for start in range(0, steps_per_epoch * batch, batch):
            warm = min(1.0, (step + 1) / steps_per_epoch)
            for group, rate in zip(optimizer.param_groups, base):
                group["lr"] = rate * scale * warm
            loss = model.loss(*data.batch(np.sort(order[start:start + batch]), device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_losses.append(loss.item())
            step += 1
        losses.append(float(np.mean(epoch_losses)))
        validation_losses.append(validation_loss(model, validation, batch))
        if validation_losses[-1] < best - MIN_IMPROVEMENT:
            best, best_epoch, waited = validation_losses[-1], epoch + 1, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            waited += 1
            scale /= 2
        bar.set_postfix(loss=f"{losses[-1]:.3f}", validation=f"{validation_losses[-1]:.3f}")
        if waited >= patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return {"losses": losses, "validation_losses": validation_losses, "best_epoch": best_epoch,
            "epochs": len(losses), "hit_the_cap": waited < patience}


MIN_IMPROVEMENT = 1e-3  # validation-loss units (nats) an epoch must gain to count as improving


@torch.no_grad()
def embed_images(model: DualEncoder, inputs, batch: int = 512) -> torch.Tensor:
    """The images' embeddings on the host, computed ``batch`` at a time on the model's device."""
    device = model_device(model)
    return torch.cat([model.embed_images(_take(inputs, np.arange(i, min(i + batch, len(inputs)))).to(device)).cpu()
                      for i in range(0, len(inputs), batch)])


@torch.no_grad()
def embed_texts(model: DualEncoder, texts: TextStates, batch: int = 512) -> torch.Tensor:
    """The captions' embeddings on the host, computed ``batch`` at a time on the model's device."""
    device = model_device(model)
    return torch.cat([model.embed_texts(texts[i:i + batch].to(device)).cpu() for i in range(0, len(texts), batch)])


# ----------------------------------------------------------------------------- evaluation


def recall_at(similarity: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Retrieval recall for a square similarity matrix whose diagonal holds the true
    pairs (rows: images, columns: captions): image → text over rows, text → image over
    columns. Ties count against the true pair."""
    true = similarity.diagonal()[:, None]
    rank_i2t = (similarity > true).sum(1) + ((similarity == true).sum(1) - 1)
    rank_t2i = (similarity.T > true).sum(1) + ((similarity.T == true).sum(1) - 1)
    out = {}
    for k in ks:
        out[f"image→text R@{k}"] = float((rank_i2t < k).float().mean())
        out[f"text→image R@{k}"] = float((rank_t2i < k).float().mean())
    return out


def swap_accuracy(images: torch.Tensor, true: torch.Tensor, swapped: torch.Tensor) -> float:
    """ARO-style: the share of images more similar to their true caption than to the
    swapped one (all embeddings unit length; a tie counts as wrong)."""
    return float(((images * true).sum(1) > (images * swapped).sum(1)).float().mean())


def winoground_scores(image0: torch.Tensor, image1: torch.Tensor, text0: torch.Tensor, text1: torch.Tensor
                      ) -> dict[str, float]:
    """Winoground's text, image and group scores for pairs (I0, C0), (I1, C1) whose
    captions contain the same words in another order (Thrush et al. 2022)."""
    s = lambda a, b: (a * b).sum(1)  # noqa: E731
    text_ok = (s(image0, text0) > s(image0, text1)) & (s(image1, text1) > s(image1, text0))
    image_ok = (s(image0, text0) > s(image1, text0)) & (s(image1, text1) > s(image0, text1))
    return {"text score": float(text_ok.float().mean()), "image score": float(image_ok.float().mean()),
            "group score": float((text_ok & image_ok).float().mean())}


@torch.no_grad()
def attention_maps(encoder: TokenEncoder, tokens: Tokens) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every layer's attention weights (N, heads, L, L) of the token encoder, additive
    weights included, by running its blocks step by step; also the output, which equals
    ``encoder(tokens)`` (tested). Computed on the encoder's device, returned on the host."""
    x, bias = encoder.sequence(tokens.to(model_device(encoder)))
    mask = bias.flatten(0, 1)
    maps = []
    for layer in encoder.backbone.blocks.layers:
        h = layer.norm1(x)
        out, weights = layer.self_attn(h, h, h, attn_mask=mask, need_weights=True, average_attn_weights=False)
        x = x + out
        x = x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))
        maps.append(weights.cpu())
    return maps, encoder.backbone.head(encoder.backbone.norm(x[:, 0])).cpu()


# ----------------------------------------------------------------------------- the chapter's experiment

VARIANTS = {
    "patch ViT": "patches of the image, learned positions",
    "semantic (segmenter masks)": "tangible tokens from the segmenter's masks, intangible tokens from the relation rule",
    "semantic (oracle masks)": "tangible tokens from the oracle masks, intangible tokens from the scene graph",
    "no intangible tokens": "the segmenter-mask model without relation tokens",
    "no additive weights": "the segmenter-mask model with its additive attention weights frozen at zero",
}
# the hard-negative kinds each kind of data provides (swapped captions of every image)
NEGATIVE_KINDS = {"scenes": ("relation", "attribute"), "coco": ("word order",)}
SEGMENTERS = ("threshold", "maskrcnn", "maskrcnn-untrained")

_BOOK = {
    "data": "scenes", "n_train": 4000, "n_val": 500, "n_test": 500, "width": 64, "depth": 4, "heads": 4,
    "embed_dim": 64, "patch": 8, "image_size": 64, "text_queries": 4, "text_layers": 1, "max_epochs": 60, "patience": 3,
    "lr": 1e-3, "batch": 256, "negatives": ["relation", "attribute"], "text_model": "minilm-l6",
    "segmenter": "threshold", "seeds": [0, 1, 2], "data_seed": 0, "threads": 2, "device": "cpu",
    "checkpoint_blocks": False,
}
PRESETS = {
    "smoke": {**_BOOK, "n_train": 256, "n_val": 64, "n_test": 64, "width": 32, "depth": 1, "heads": 2,
              "embed_dim": 32, "max_epochs": 2, "patience": 1, "batch": 64, "text_model": "tiny-bert-encoder",
              "seeds": [0, 1]},
    "book": _BOOK,
    # COCO captions (a local copy of the 2017 images and caption annotations), Mask R-CNN
    # instance masks, the relation rule for intangible tokens, ViT-B-sized encoders
    "paper": {**_BOOK, "data": "coco", "n_train": 113000, "n_val": 5000, "n_test": 5000, "width": 768, "depth": 12,
              "heads": 12, "embed_dim": 512, "patch": 16, "image_size": 224, "max_epochs": 40, "lr": 5e-4,
              "negatives": ["word order"],
              "batch": 512, "text_model": "minilm-l6-hub", "segmenter": "maskrcnn", "threads": 16, "device": "auto",
              # ViT-B at batch 512 keeps ~92 GB of activations for backward in float32; one block's, recomputed
              "checkpoint_blocks": True},
}

# what each parameter may be: checked before any model loads (config.resolve); not part
# of the chapter's code version, since a rule never changes a run it accepts
def parameter_rules():
    import os

    from .config import Rule, device, flag, integer, items, model, number, one_of, relation

    coco_folder = Rule("the path of a COCO folder holding annotations/",
                       lambda v, _: isinstance(v, str) and os.path.isdir(os.path.join(v, "annotations")))
    return {
        "data": one_of("scenes") | coco_folder,
        "n_train": integer(1),
        "n_val": integer(1),
        "n_test": integer(2),
        "width": integer(4),
        "depth": integer(1),
        "heads": integer(1),
        "embed_dim": integer(1),
        "patch": integer(1),
        "image_size": integer(16, 1024),
        "text_queries": integer(1),
        "text_layers": integer(0),
        "max_epochs": integer(1),
        "patience": integer(1),
        "lr": number(above=0, maximum=1),
        "batch": integer(1),
        "negatives": items(one_of(*sorted({k for kinds in NEGATIVE_KINDS.values() for k in kinds})), min_items=0),
        "text_model": model("sentence-encoder"),
        "segmenter": one_of(*SEGMENTERS),
        "seeds": items(integer(0)),
        "data_seed": integer(0),
        "threads": integer(1),
        "device": device(),
        "checkpoint_blocks": flag(),
        "heads_divide_width": relation("width, heads", "width must be a multiple of heads",
                                       lambda v: v["width"] % v["heads"] == 0),
        "patches_tile_the_image": relation("image_size, patch", "image_size must be a multiple of patch",
                                           lambda v: v["image_size"] % v["patch"] == 0),
        "negatives_the_data_has": relation(
            "data, negatives", "generated scenes have relation and attribute negatives, COCO word order",
            lambda v: set(v["negatives"]) <= set(NEGATIVE_KINDS["scenes" if v["data"] == "scenes" else "coco"])),
        "a_batch_fits_the_training_set": relation("n_train, batch", "batch must not exceed n_train",
                                                  lambda v: v["batch"] <= v["n_train"]),
    }


@dataclass
class Split:
    """Images with captions; for generated scenes also the oracle masks, scene graphs, the
    swapped captions and the Winoground-style partner images."""

    images: np.ndarray
    captions: list[str]
    oracle: np.ndarray | None = None
    graphs: list | None = None
    negatives: dict[str, list[str]] = field(default_factory=dict)
    partner: "Split | None" = None


def scene_split(n: int, held_out: bool | None, seed: int, partners: bool = False) -> Split:
    scenes = make_scenes(n, held_out, seed)
    images, oracle = render_all(scenes)
    split = Split(images, [s.caption for s in scenes], oracle, oracle_graphs(scenes),
                  {"relation": [s.relation_swapped for s in scenes], "attribute": [s.attribute_swapped for s in scenes]})
    if partners:
        mirrored = [s.mirrored() for s in scenes]
        m_images, m_oracle = render_all(mirrored)
        split.partner = Split(m_images, [s.caption for s in mirrored], m_oracle, oracle_graphs(mirrored))
    return split


TRAINING_SPLITS = ("train", "validation")  # every other split is a test split


def test_splits(data) -> list[str]:
    return [name for name in data if name not in TRAINING_SPLITS]


def load_data(cfg) -> dict[str, Split]:
    """``train``, ``validation`` (drawn like the training data; it decides when training
    stops) and the test splits: generated scenes (``held-out combinations``: every
    scene has a colour–shape pair never seen in training; ``seen combinations``), or a
    local COCO folder (``data`` = its path; validation = the ``n_val`` train images after
    the first ``n_train``; ``test`` = the first ``n_test`` val images)."""
    if cfg.data == "scenes":  # data_seed 0 draws the scenes with seeds 1, 2, 3; each data seed its own
        first = 3 * cfg.data_seed + 1
        return {"train": scene_split(cfg.n_train, False, first),
                "validation": scene_split(cfg.n_val, False, VALIDATION_SEEDS + cfg.data_seed),
                "held-out combinations": scene_split(cfg.n_test, True, first + 1, partners=True),
                "seen combinations": scene_split(cfg.n_test, False, first + 2, partners=True)}
    from pathlib import Path

    if not (Path(cfg.data) / "annotations").is_dir():
        raise ValueError(f"data={cfg.data!r}: use 'scenes' or the path of a COCO folder with annotations/ "
                         f"captions_train2017.json, captions_val2017.json and the train2017/ val2017/ images")
    return {"train": coco_split(Path(cfg.data), "train2017", cfg.n_train, cfg.image_size),
            "validation": coco_split(Path(cfg.data), "train2017", cfg.n_val, cfg.image_size, skip=cfg.n_train),
            "test": coco_split(Path(cfg.data), "val2017", cfg.n_test, cfg.image_size)}


VALIDATION_SEEDS = 1000  # validation scenes are drawn with seed 1000 + data_seed, apart from the others


def coco_split(root, split: str, n: int, size: int, skip: int = 0) -> Split:
    """``n`` images of a COCO split (sorted by id, after the first ``skip``), each with its
    first caption, resized to ``size`` px; negatives: the caption with its word trigrams
    shuffled (ARO's COCO-Order perturbation)."""
    import json

    from PIL import Image

    annotations = json.loads((root / "annotations" / f"captions_{split}.json").read_text())
    files = {im["id"]: im["file_name"] for im in annotations["images"]}
    first = {}
    for a in sorted(annotations["annotations"], key=lambda a: a["id"]):
        first.setdefault(a["image_id"], a["caption"].strip())
    ids = sorted(first)[skip:skip + n]
    images = np.stack([np.asarray(Image.open(root / split / files[i]).convert("RGB").resize((size, size)))
                       for i in ids])
    captions = [first[i] for i in ids]
    rng = np.random.default_rng(0)
    return Split(images, captions, negatives={"word order": [shuffle_trigrams(c, rng) for c in captions]})


def shuffle_trigrams(caption: str, rng: np.random.Generator) -> str:
    """ARO's COCO-Order negative: cut the caption into word trigrams and shuffle them
    (re-drawn until the order changes, when it can)."""
    words = caption.split()
    grams = [words[i:i + 3] for i in range(0, len(words), 3)]
    if len(grams) < 2:
        return caption
    for _ in range(10):
        order = rng.permutation(len(grams))
        if (order != np.arange(len(grams))).any():
            break
    return " ".join(w for g in order for w in grams[g])


def segment_images(images: np.ndarray, segmenter: str, progress: str | None = None, device: str = "cpu") -> np.ndarray:
    """Instance maps from the chosen segmenter: ``threshold`` (:func:`segment`), or
    torchvision's Mask R-CNN (COCO weights, or untrained to test the code path) on
    ``device``, one image at a time; the maps are kept on the host."""
    if segmenter == "threshold":
        return segment_all(images)
    if segmenter not in SEGMENTERS:
        raise ValueError(f"segmenter={segmenter!r}: choose from {SEGMENTERS}")
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_V2_Weights, maskrcnn_resnet50_fpn_v2
    from tqdm.auto import tqdm

    trained = segmenter == "maskrcnn"
    net = maskrcnn_resnet50_fpn_v2(weights=MaskRCNN_ResNet50_FPN_V2_Weights.DEFAULT if trained else None,
                                   weights_backbone=None, min_size=images.shape[1], max_size=images.shape[1])
    net = net.eval().to(device)
    out = np.zeros(images.shape[:3], np.int64)
    with torch.no_grad():
        for i in tqdm(range(len(images)), desc=progress, disable=progress is None, leave=False):
            found = net([torch.as_tensor(images[i]).to(device).permute(2, 0, 1).float() / 255])[0]
            keep = (found["scores"] > (0.5 if trained else 0.0)).nonzero().flatten()[:4]
            for k, j in enumerate(keep.tolist()):
                out[i][(found["masks"][j, 0] > 0.5).cpu().numpy() & (out[i] == 0)] = k + 1
    return out


def variants_for(cfg) -> list[str]:
    """The encoders this run compares (no oracle variants on COCO)."""
    if cfg.data == "scenes":
        return list(VARIANTS)
    return ["patch ViT", "semantic (segmenter masks)", "no intangible tokens", "no additive weights"]


def inputs_for(variant: str, split: Split, found: np.ndarray | None):
    """What a variant's encoder reads for a split: pixels, or semantic tokens from the
    oracle (scene graph) or the segmenter's masks (relation rule)."""
    if variant == "patch ViT":
        return to_tensor(split.images)
    if variant == "semantic (oracle masks)" and split.oracle is not None:
        return build_tokens(split.images, split.oracle, split.graphs)
    return build_tokens(split.images, found)  # the headline model and its two ablations


def build_encoder(variant: str, cfg) -> nn.Module:
    if variant == "patch ViT":
        return PatchEncoder(cfg.width, cfg.depth, cfg.heads, cfg.embed_dim, cfg.patch, cfg.image_size,
                            checkpoint_blocks=cfg.checkpoint_blocks)
    return TokenEncoder(cfg.width, cfg.depth, cfg.heads, cfg.embed_dim, intangible=variant != "no intangible tokens",
                        additive=variant != "no additive weights", checkpoint_blocks=cfg.checkpoint_blocks)


def text_encoder(cfg):
    from . import models

    return models.load(cfg.text_model, preset=cfg.preset).model


def cached_text_states(encoder, captions: list[str], key: str) -> TextStates:
    """:func:`text_states`, cached outside the repo (``paths.cached_torch``: checksummed,
    built under a lock, loaded without running code) under a hash of the captions, the
    encoder's name and this module's code."""
    import sys

    from .paths import cached_torch, code_hash

    def build():
        states = text_states(encoder, captions)
        return {"states": states.states, "mask": states.mask}

    saved, _ = cached_torch("semtokens", "text\n" + "\n".join(captions) + key + code_hash(sys.modules[__name__]), build)
    return TextStates(saved["states"], saved["mask"])


def trained_model(variant: str, cfg, seed: int, data: TrainingSet, validation: TrainingSet, fingerprint: str,
                  progress: str | None = None) -> tuple[DualEncoder, dict]:
    """A dual encoder trained on the training split to a plateau of the validation loss
    (:func:`train`) — cached outside the repo (``paths.cached_torch``: a damaged entry is
    retrained, never loaded) under a hash of the data, the settings, the seed and this
    module's code; returns it on ``cfg.device`` and how it came to be (training seconds,
    losses per epoch, the epoch kept)."""
    import json
    import sys
    import time

    from .config import run_device
    from .paths import cached_torch, code_hash

    device = torch.device(run_device(cfg.device))

    settings = {k: cfg[k] for k in ("width", "depth", "heads", "embed_dim", "patch", "image_size", "text_queries",
                                    "text_layers", "max_epochs", "patience", "lr", "batch", "negatives")}
    key = "model\n" + fingerprint + variant + json.dumps(settings) + str(seed) + code_hash(sys.modules[__name__])
    if device.type != "cpu":  # a GPU trains to other weights than the CPU (float rounding): its own entry
        key += f"@{device.type}"

    def fresh() -> DualEncoder:
        torch.manual_seed(seed)  # built on the host, so the initial weights do not depend on the device
        return DualEncoder(build_encoder(variant, cfg), data.captions.states.shape[-1], cfg.embed_dim,
                           cfg.text_queries, cfg.text_layers, cfg.width).to(device)

    def build():
        model = fresh()
        start = time.perf_counter()
        history = train(model, data, validation, cfg.lr, cfg.batch, seed, cfg.max_epochs, cfg.patience,
                        progress=progress)
        facts = {"train_seconds": round(time.perf_counter() - start, 1),
                 "best_validation_loss": history["validation_losses"][history["best_epoch"] - 1], **history}
        return {"state": {k: v.cpu() for k, v in model.state_dict().items()}, "facts": facts}

    saved, from_cache = cached_torch("semtokens", key, build)
    model = fresh()
    model.load_state_dict(saved["state"])
    return model.eval(), {**saved["facts"], "training": "cached" if from_cache else "trained now"}


@torch.no_grad()
def evaluate(model: DualEncoder, images, texts: dict[str, TextStates], partner_images=None) -> dict[str, float]:
    """Retrieval recall, the swap tests for every negative kind, and Winoground-style
    scores when the split has partner images. ``texts``: "captions" plus one entry per
    negative kind."""
    image_emb = embed_images(model, images)
    caption_emb = embed_texts(model, texts["captions"])
    out = recall_at(image_emb @ caption_emb.T)
    for kind, states in texts.items():
        if kind != "captions":
            out[f"{kind} swap"] = swap_accuracy(image_emb, caption_emb, embed_texts(model, states))
    if partner_images is not None:
        partner_emb = embed_images(model, partner_images)
        wino = winoground_scores(image_emb, partner_emb, caption_emb, embed_texts(model, texts["relation"]))
        out.update({f"winoground {k}": v for k, v in wino.items()})
    return out


@dataclass
class Prepared:
    """Everything the encoders read, built once per run: per variant and split the image
    inputs (and the partner images'), per split the caption states, the segmenter's
    instance maps and a fingerprint of the training data."""

    inputs: dict[str, dict[str, object]]
    partner_inputs: dict[str, dict[str, object]]
    texts: dict[str, dict[str, TextStates]]
    found: dict[str, np.ndarray]
    fingerprint: str

    def training_set(self, variant: str, split: str, negatives: list[str]) -> TrainingSet:
        """What ``variant`` trains (``train``) or validates (``validation``) on, with the
        swapped captions of each hard-negative kind in ``negatives``."""
        texts = self.texts[split]
        return TrainingSet(self.inputs[variant][split], texts["captions"], {kind: texts[kind] for kind in negatives})


def prepare(cfg, data: dict[str, Split], progress: bool = True) -> Prepared:
    import hashlib

    from tqdm.auto import tqdm

    from .config import run_device

    encoder = text_encoder(cfg)  # on the host: a frozen pass over short captions
    device = run_device(cfg.device)
    texts, found, partner_found = {}, {}, {}
    for name, split in tqdm(data.items(), desc="segment and encode captions", disable=not progress):
        found[name] = segment_images(split.images, cfg.segmenter, device=device)
        if split.partner is not None:
            partner_found[name] = segment_images(split.partner.images, cfg.segmenter, device=device)
        texts[name] = {"captions": cached_text_states(encoder, split.captions, cfg.text_model),
                       **{kind: cached_text_states(encoder, captions, cfg.text_model)
                          for kind, captions in split.negatives.items()}}
    inputs, partner_inputs = {}, {}
    for variant in variants_for(cfg):
        inputs[variant] = {name: inputs_for(variant, split, found[name]) for name, split in data.items()}
        partner_inputs[variant] = {name: inputs_for(variant, split.partner, partner_found[name])
                                   for name, split in data.items() if split.partner is not None}
    digest = hashlib.sha256(cfg.text_model.encode() + cfg.segmenter.encode())
    for name in TRAINING_SPLITS:  # what training reads: images, captions and every swapped caption
        digest.update(data[name].images.tobytes())
        for captions in [data[name].captions, *data[name].negatives.values()]:
            digest.update("\n".join(captions).encode())
    return Prepared(inputs, partner_inputs, texts, found, digest.hexdigest())


def run_all(cfg, prepared: Prepared, progress: bool = True) -> tuple[list[dict], list[dict]]:
    """Train every variant with every seed (or load it from the cache) and evaluate it on
    every test split; returns one row per (variant, seed, split) and one per training."""
    from tqdm.auto import tqdm

    rows, trainings = [], []
    jobs = [(seed, variant) for seed in cfg.seeds for variant in variants_for(cfg)]
    bar = tqdm(jobs, desc="train and evaluate", disable=not progress)
    for seed, variant in bar:
        bar.set_postfix_str(f"{variant}, seed {seed}")
        model, facts = trained_variant(variant, cfg, seed, prepared)
        trainings.append({"variant": variant, "seed": seed, **facts})
        for split in test_splits(prepared.texts):
            texts = prepared.texts[split]
            partner = prepared.partner_inputs[variant].get(split)
            rows.append({"variant": variant, "seed": seed, "split": split,
                         **evaluate(model, prepared.inputs[variant][split], texts, partner)})
    return rows, trainings


def trained_variant(variant: str, cfg, seed: int, prepared: Prepared) -> tuple[DualEncoder, dict]:
    """``variant`` trained with ``seed`` on the prepared training split, validated on the
    validation split, both with the hard negatives ``cfg.negatives`` (cached)."""
    return trained_model(variant, cfg, seed, prepared.training_set(variant, "train", cfg.negatives),
                         prepared.training_set(variant, "validation", cfg.negatives), prepared.fingerprint)


def paired_gain(table, better: str, worse: str, metric: str, split: str) -> tuple[float, float, float]:
    """Mean over seeds of ``better − worse`` on ``metric`` and its 95% t interval (the
    seeds pair the runs: same data order and initialisation seed)."""
    from .results import mean_interval

    part = table[table.split == split].pivot(index="seed", columns="variant", values=metric)
    return mean_interval((part[better] - part[worse]).to_numpy())


def reference_variant(variants: list[str]) -> str:
    """The semantic-token model the claims are judged on: the segmenter's masks, the
    paper's setting (an off-the-shelf segmenter); the oracle's clean masks and scene graph
    are an upper bound shown beside it."""
    if "semantic (segmenter masks)" not in variants:
        raise ValueError(f"variants={variants}: the segmenter-mask model is missing")
    return "semantic (segmenter masks)"
