"""Chapter 05 — Compositional text-to-image generation (Zarei, Rezaei et al., 2024,
arXiv 2406.07844).

The paper traces attribute-binding failures of Stable Diffusion ("a red circle and a
blue square" drawn with the colours swapped) to the CLIP text encoder's output, and
fixes much of it by training only a linear projection (WiCLP) on that output. No
diffusion model can be had offline, so the book builds the whole pipeline small:
scenes of two coloured shapes, a CLIP text encoder pretrained contrastively on their
captions, and a small text-conditioned UNet trained with diffusers. This module holds
the pieces, each tested: scenes and captions; the deterministic binding checker that
stands in for BLIP-VQA; the word-level tokenizer and small CLIP with its contrastive
pretraining; the UNet, its training and DDIM sampling with classifier-free guidance
and the switch-off schedule; the last layer's attention between the objects' tokens
and its re-weighting (C2); per-prompt optimized text states (C1); the zero-initialized
linear and WiCLP projections and their training (C3); the FID-style distance.
The chapter's notebook and experiments come next (see the issue).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ----------------------------------------------------------------------------- scenes
#
# A scene is two objects, one in each half of the image; a caption names both, in a
# random order, without saying which is where, so binding a colour to its shape is the
# only thing that makes an image right.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 200, 30),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (235, 235, 235)


@dataclass(frozen=True)
class Scene:
    """Two (colour, shape) objects: the left one and the right one."""

    left: tuple[str, str]
    right: tuple[str, str]

    @property
    def objects(self) -> frozenset[tuple[str, str]]:
        return frozenset((self.left, self.right))


def caption(scene: Scene, left_first: bool = True) -> str:
    """ "a red circle and a blue square" (which object is named first carries no position)."""
    first, second = (scene.left, scene.right) if left_first else (scene.right, scene.left)
    return f"a {first[0]} {first[1]} and a {second[0]} {second[1]}"


def parse_caption(text: str) -> frozenset[tuple[str, str]]:
    """The two (colour, shape) objects a caption names."""
    words = text.split()
    if len(words) != 7 or words[0] != "a" or words[3] != "and" or words[4] != "a":
        raise ValueError(f"caption {text!r} is not of the form 'a <colour> <shape> and a <colour> <shape>'")
    return frozenset({(words[1], words[2]), (words[5], words[6])})


def all_scenes(distinct_colours: bool = True, distinct_shapes: bool = True) -> list[Scene]:
    """Every scene (left, right) over the palette and shapes; by default the two objects
    differ in colour and in shape, so a swapped binding is a visible error."""
    objects = [(c, s) for c in COLOURS for s in SHAPES]
    return [Scene(a, b) for a in objects for b in objects
            if (a[0] != b[0] or not distinct_colours) and (a[1] != b[1] or not distinct_shapes)]


def _shape_mask(shape: str, size: int, centre: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    cy, cx = centre
    if shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2
    if shape == "square":
        half = radius * 0.85  # a square of about the circle's area
        return (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
    if shape == "triangle":  # apex up, base down, about the circle's height
        top, bottom = cy - radius, cy + radius
        t = (yy - top) / (bottom - top)  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(xx - cx) <= t * radius * 1.1)
    raise ValueError(f"shape={shape!r}: choose from {list(SHAPES)}")


def render(scene: Scene, size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """(size, size, 3) uint8: each object drawn in its half, with a random radius and
    position jitter when ``rng`` is given (centred and fixed otherwise)."""
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    half = size / 2
    for k, (colour, shape) in enumerate((scene.left, scene.right)):
        if rng is None:
            radius, dy, dx = size * 0.17, 0.0, 0.0
        else:
            radius = size * rng.uniform(0.15, 0.2)
            room = half / 2 - radius
            dy, dx = rng.uniform(-room, room) * 0.8, rng.uniform(-room, room) * 0.8
        centre = (half + dy, half / 2 + k * half + dx)
        image[_shape_mask(shape, size, centre, radius)] = COLOURS[colour]
    return image


# ----------------------------------------------------------------------------- the binding checker
#
# Stand-in for the paper's BLIP-VQA score: reads the two objects back from the pixels.
# Each half's foreground (pixels far from the image's border colour) is assigned to its nearest
# palette colour by majority; its shape comes from how much of its bounding box it
# fills: the nearest of the mean fills of rendered shapes (square 1, circle 0.79 ≈ π/4,
# triangle 0.55, a little above 1/2 from pixel rounding).
FILL = {"square": 1.0, "circle": 0.79, "triangle": 0.55}


@dataclass(frozen=True)
class Reading:
    """What the checker sees in one half: colour and shape, or None where it finds no object."""

    colour: str | None
    shape: str | None


def background_colour(image: np.ndarray) -> np.ndarray:
    """The median colour of the image's border: a generated image's background drifts
    from the rendered light grey (tinted, noisy), so it is estimated per image."""
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(float)
    return np.median(border, axis=0)


def _main_blob(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected foreground component, holes filled: generated objects
    have ragged edges and stray pixels that would otherwise inflate the bounding box."""
    from scipy import ndimage

    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    largest = 1 + int(np.argmax(ndimage.sum(mask, labels, index=range(1, count + 1))))
    return ndimage.binary_fill_holes(labels == largest)


def read_half(half: np.ndarray, background: np.ndarray | None = None, min_pixels: int = 6) -> Reading:
    pixels = half.reshape(-1, 3).astype(float)
    background = np.array(BACKGROUND, dtype=float) if background is None else background
    foreground = np.abs(pixels - background).max(1) > 60
    if foreground.sum() < min_pixels:
        return Reading(None, None)
    palette = np.array(list(COLOURS.values()), dtype=float)
    nearest = np.argmin(((pixels[foreground, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    colour = list(COLOURS)[int(np.bincount(nearest, minlength=len(palette)).argmax())]
    mask = _main_blob(foreground.reshape(half.shape[:2]))
    if mask.sum() < min_pixels:
        return Reading(colour, None)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    box = (rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1)
    fill = mask.sum() / box
    shape = min(FILL, key=lambda s: abs(FILL[s] - fill))
    return Reading(colour, shape)


def read_scene(image: np.ndarray) -> tuple[Reading, Reading]:
    """The checker's reading of the left and the right half of an image."""
    width = image.shape[1]
    background = background_colour(image)
    return read_half(image[:, : width // 2], background), read_half(image[:, width // 2:], background)


def binding_correct(image: np.ndarray, prompt: str) -> bool:
    """Does the image show exactly the prompt's two (colour, shape) objects, one per half?"""
    left, right = read_scene(image)
    return {(left.colour, left.shape), (right.colour, right.shape)} == set(parse_caption(prompt))


def binding_score(image: np.ndarray, prompt: str) -> float:
    """Partial credit, like the paper's per-object VQA questions: the share of the
    prompt's two objects found (right colour on the right shape) in some half."""
    left, right = read_scene(image)
    seen = {(left.colour, left.shape), (right.colour, right.shape)}
    return sum(obj in seen for obj in parse_caption(prompt)) / 2


# ----------------------------------------------------------------------------- the text encoder
#
# A CLIP text encoder (transformers' CLIPTextModel: causal self-attention, the last
# token pooled) over the captions' 12-word vocabulary, pretrained contrastively
# against a small CLIP vision tower on rendered scenes — the recipe whose
# bag-of-words tendency the paper blames.
VOCAB = ["<pad>", "<start>", "a", "<end>", "and", *COLOURS, *SHAPES]
MAX_TOKENS = 9  # <start> a colour shape and a colour shape <end>


def tokenizer():
    """A word-level ``PreTrainedTokenizerFast`` over ``VOCAB`` that adds <start>/<end>
    and pads to ``MAX_TOKENS``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {w: i for i, w in enumerate(VOCAB)}
    core = Tokenizer(models.WordLevel(ids, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(
        single="<start> $A <end>", special_tokens=[("<start>", ids["<start>"]), ("<end>", ids["<end>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<start>",
                                   eos_token="<end>", model_max_length=MAX_TOKENS)


def encode_captions(tok, captions: list[str]):
    """(input ids, attention mask) padded to ``MAX_TOKENS``."""
    batch = tok(list(captions), padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt")
    return batch.input_ids, batch.attention_mask


def clip_config(width: int = 64, layers: int = 3, image_size: int = 32):
    """A small CLIP: the text tower the diffusion model is conditioned on, and a ViT
    over 8×8 patches used only for contrastive pretraining."""
    from transformers import CLIPConfig

    ids = {w: i for i, w in enumerate(VOCAB)}
    text = {"vocab_size": len(VOCAB), "hidden_size": width, "intermediate_size": 2 * width,
            "num_hidden_layers": layers, "num_attention_heads": 4, "max_position_embeddings": 16,
            "pad_token_id": ids["<pad>"], "bos_token_id": ids["<start>"], "eos_token_id": ids["<end>"],
            "projection_dim": width}
    vision = {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
              "num_attention_heads": 4, "image_size": image_size, "patch_size": 8, "projection_dim": width}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=width)


def to_pixels(images: np.ndarray):
    """uint8 (B, H, W, 3) → float (B, 3, H, W) in [-1, 1]."""
    import torch

    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_images(pixels) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] → uint8 (B, H, W, 3)."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def scene_batch(scenes: list[Scene], size: int, batch: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, list[str], list[Scene]]:
    """``batch`` random scenes from ``scenes``, rendered with jitter, and their captions
    (objects named in a random order)."""
    picked = [scenes[i] for i in rng.integers(0, len(scenes), batch)]
    images = np.stack([render(s, size, rng) for s in picked])
    captions = [caption(s, bool(rng.integers(0, 2))) for s in picked]
    return images, captions, picked


def pretrain_clip(scenes: list[Scene], cfg, progress: bool = True):
    """Contrastive pretraining (CLIP's symmetric InfoNCE, ``CLIPModel(return_loss=True)``)
    of the small CLIP on rendered scenes and their captions. Returns (model, losses)."""
    import torch
    from tqdm.auto import tqdm
    from transformers import CLIPModel

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = CLIPModel(clip_config(cfg.text_width, cfg.text_layers, cfg.image_size))
    tok = tokenizer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.clip_lr, weight_decay=0.1)
    losses = []
    for _ in tqdm(range(cfg.clip_steps), desc="CLIP pretraining", disable=not progress, leave=False):
        images, captions, _ = scene_batch(scenes, cfg.image_size, cfg.clip_batch, rng)
        ids, mask = encode_captions(tok, captions)
        loss = model(input_ids=ids, attention_mask=mask, pixel_values=to_pixels(images), return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return model.eval(), losses


# ----------------------------------------------------------------------------- the diffusion model


def unet(image_size: int = 32, width: int = 16, text_width: int = 64):
    """A small text-conditioned UNet (diffusers' ``UNet2DConditionModel``): three
    resolutions (width, 2·width, 4·width channels), cross-attention to the text
    encoder's token outputs at the coarsest one, like Stable Diffusion's at a far
    smaller scale. Attention only at the coarsest resolution keeps a training step
    on two CPU cores near a tenth of a second."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=image_size, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(width, 2 * width, 4 * width),
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_width, attention_head_dim=8, norm_num_groups=min(8, width))


def noise_scheduler():
    """DDPM training schedule (1000 steps, cosine betas)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def text_states(text_model, tok, captions: list[str]):
    """The text encoder's token outputs (B, MAX_TOKENS, d): what the UNet attends to
    (Stable Diffusion conditions on all 77 of CLIP's output tokens the same way)."""
    import torch

    ids, mask = encode_captions(tok, captions)
    with torch.no_grad():
        return text_model(input_ids=ids, attention_mask=mask).last_hidden_state


def denoising_loss(model, scheduler, pixels, states, generator=None):
    """Stable Diffusion's training loss: MSE between the noise added at a random
    timestep and the UNet's prediction of it."""
    import torch

    noise = torch.randn(pixels.shape, generator=generator)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (len(pixels),), generator=generator)
    predicted = model(scheduler.add_noise(pixels, noise, steps), steps, encoder_hidden_states=states).sample
    return torch.nn.functional.mse_loss(predicted, noise)


def train_diffusion(text_model, scenes: list[Scene], cfg, progress: bool = True):
    """Train the UNet on rendered scenes conditioned on the frozen text encoder's
    outputs; one caption in ``cfg.caption_dropout`` is replaced by the empty caption so
    that sampling can use classifier-free guidance. Returns (UNet, losses)."""
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    model = unet(cfg.image_size, cfg.unet_width, cfg.text_width)
    scheduler = noise_scheduler()
    tok = tokenizer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.unet_lr)
    losses = []
    for _ in tqdm(range(cfg.unet_steps), desc="UNet training", disable=not progress, leave=False):
        images, captions, _ = scene_batch(scenes, cfg.image_size, cfg.unet_batch, rng)
        captions = ["" if rng.random() < cfg.caption_dropout else c for c in captions]
        loss = denoising_loss(model, scheduler, to_pixels(images), text_states(text_model, tok, captions))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return model.eval(), losses


def generate(model, states, empty_state, steps: int = 25, guidance: float = 3.0, seed: int = 0,
             late_states=None, switch_at: int | None = None) -> np.ndarray:
    """Images (B, H, W, 3) sampled with DDIM and classifier-free guidance from text
    states (B, T, d). With ``late_states`` and ``switch_at``, the first ``switch_at``
    (noisiest) steps use ``states`` and the rest ``late_states`` — the paper's
    switch-off schedule, which keeps the fine-tuned embedding only where the layout is
    decided."""
    import torch
    from diffusers import DDIMScheduler

    sampler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    sampler.set_timesteps(steps)
    size = model.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((len(states), 3, size, size), generator=generator)
    empty = empty_state.expand(len(states), -1, -1)
    with torch.no_grad():
        for k, t in enumerate(sampler.timesteps):
            cond = states if late_states is None or switch_at is None or k < switch_at else late_states
            both = model(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([empty, cond])).sample
            uncond, text = both.chunk(2)
            x = sampler.step(uncond + guidance * (text - uncond), t, x).prev_sample
    return to_images(x)


# ----------------------------------------------------------------------------- the fixes: projections on the text output


def projection(kind: str, width: int, window: int = 5):
    """A trainable map on the text encoder's token outputs, zero-initialized as a
    residual so that before training it leaves the pipeline exactly as it was:

    - ``linear``: x + W x, the same W for every token (the paper's linear projection);
    - ``wiclp``: x + Conv1d(d, d, kernel ``window``, 'same') over the token axis — the
      paper's WiCLP, which lets a token's new embedding read its neighbours (a colour
      next to its shape).
    """
    from torch import nn

    class TokenProjection(nn.Module):
        def __init__(self):
            super().__init__()
            if kind == "linear":
                self.map = nn.Linear(width, width, bias=False)
            elif kind == "wiclp":
                self.map = nn.Conv1d(width, width, window, padding="same", bias=False)
            else:
                raise ValueError(f"projection kind={kind!r}: choose from ['linear', 'wiclp']")
            nn.init.zeros_(self.map.weight)

        def forward(self, states):
            if kind == "linear":
                return states + self.map(states)
            return states + self.map(states.transpose(1, 2)).transpose(1, 2)

    return TokenProjection()


# ----------------------------------------------------------------------------- C2: attention between the objects' tokens
#
# Token positions of "<start> a c1 s1 and a c2 s2 <end>": the first object's colour and
# shape at 2, 3; the second's at 6, 7. CLIP's text attention is causal, so the second
# object's tokens can read the first's, never the reverse.
FIRST_OBJECT, SECOND_OBJECT, END = (2, 3), (6, 7), 8


def final_attention(text_model, tok, captions: list[str]):
    """The last layer's attention probabilities (B, T, T), averaged over heads."""
    import torch

    from .mllmtrace import eager_attention

    ids, mask = encode_captions(tok, captions)
    with eager_attention(text_model), torch.no_grad():
        out = text_model(input_ids=ids, attention_mask=mask, output_attentions=True)
    return out.attentions[-1].mean(1)


def _add_to_mask(mask, bias):
    """An additive attention mask: the layer's own (boolean, additive, or None for
    "causal only") plus ``bias``."""
    import torch

    if mask is None:  # full-length inputs: the layer would apply only the causal mask
        size = bias.shape[-1]
        mask = torch.ones(size, size, dtype=torch.bool).tril()[None, None]
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=bias.dtype).masked_fill(~mask, torch.finfo(bias.dtype).min)
    return mask + bias


def reweighted_states(text_model, tok, captions: list[str], scale: float, layers: list[int] | None = None):
    """Token outputs with the attention of the second object's tokens (queries 6, 7) to
    the first object's (keys 2, 3) multiplied by ``scale`` and renormalized, in the
    given layers (all by default) — the paper's re-weighting of erroneous attention
    contributions. Adding log(scale) to those attention logits is exactly that."""
    import math

    import torch

    ids, mask = encode_captions(tok, captions)
    bias = torch.zeros(1, 1, MAX_TOKENS, MAX_TOKENS)
    for q in SECOND_OBJECT:
        for k in FIRST_OBJECT:
            bias[..., q, k] = math.log(scale) if scale > 0 else torch.finfo(torch.float32).min / 2
    attention_layers = [layer.self_attn for layer in text_model.encoder.layers]
    chosen = range(len(attention_layers)) if layers is None else layers

    def hook(module, args, kwargs):
        if "attention_mask" not in kwargs and len(args) > 1:
            raise RuntimeError("reweighted_states expects CLIPAttention to take attention_mask by keyword")
        kwargs["attention_mask"] = _add_to_mask(kwargs.get("attention_mask"), bias)
        kwargs["is_causal"] = False  # the mask now carries the causal part itself
        return args, kwargs

    handles = [attention_layers[i].register_forward_pre_hook(hook, with_kwargs=True) for i in chosen]
    try:
        with torch.no_grad():
            return text_model(input_ids=ids, attention_mask=mask).last_hidden_state
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------- C1 and C3: training embeddings and projections


def denoising_targets(scenes: list[Scene], views: int, size: int, rng: np.random.Generator):
    """``views`` jittered renders of every scene, with a caption each: the image-text
    pairs the embeddings and projections are fitted to."""
    images, captions = [], []
    for s in scenes:
        for v in range(views):
            images.append(render(s, size, rng))
            captions.append(caption(s, left_first=v % 2 == 0))
    return np.stack(images), captions


def optimize_states(model, states, pixels, steps: int, lr: float, seed: int = 0, progress: bool = False):
    """The paper's first experiment: the text encoder's output for one prompt, (1, T, d),
    optimized directly (everything else frozen) to minimize the denoising loss on
    images of that prompt ``pixels`` (N, 3, H, W). Returns the optimized states."""
    import torch
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    scheduler = noise_scheduler()
    target = torch.nn.Parameter(states.detach().clone())
    optimizer = torch.optim.Adam([target], lr=lr)
    for p in model.parameters():
        p.requires_grad_(False)
    for _ in tqdm(range(steps), desc="embedding", disable=not progress, leave=False):
        loss = denoising_loss(model, scheduler, pixels, target.expand(len(pixels), -1, -1), generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return target.detach()


def train_projection(projection, model, states, pixels, steps: int, lr: float, batch: int, seed: int = 0,
                     progress: bool = True) -> list[float]:
    """Train only ``projection`` on the text states (N, T, d) of image-text pairs
    ``pixels`` (N, 3, H, W), with the denoising loss (UNet and text encoder frozen)."""
    import torch
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    scheduler = noise_scheduler()
    for p in model.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(projection.parameters(), lr=lr)
    losses = []
    for _ in tqdm(range(steps), desc="projection", disable=not progress, leave=False):
        rows = torch.randint(0, len(pixels), (batch,), generator=generator)
        loss = denoising_loss(model, scheduler, pixels[rows], projection(states[rows]), generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


# ----------------------------------------------------------------------------- quality


def quality_features(encoder, images: np.ndarray, size: int = 128, batch: int = 64) -> np.ndarray:
    """EfficientNet-Lite0's mean-pooled 1280-d features of images upscaled to ``size``
    (at 32 px the network sees too little): the space of the FID-style distance,
    standing in for FID's Inception-v3 features."""
    import torch

    from .zoo import efficientnet_input

    with torch.inference_mode():
        return torch.cat([encoder.extract_features(efficientnet_input(images[i:i + batch], size)).mean((2, 3))
                          for i in range(0, len(images), batch)]).numpy().astype(np.float64)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID's distance between Gaussians fitted to two feature sets (rows):
    ‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½)."""
    from scipy import linalg

    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.real(linalg.sqrtm(cov_a @ cov_b))
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))
