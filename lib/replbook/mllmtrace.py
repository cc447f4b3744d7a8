"""Information storage and transfer in multimodal LLMs (Basu et al., NeurIPS 2024,
arXiv 2406.04236; no official code found).

Three tools, for any transformers decoder with ``model.model.layers`` (Llama family):

- **causal tracing** (:func:`causal_trace`): run the prompt clean and with its
  *constraint* corrupted (the visual tokens of the image, or the tokens of a name, by
  noise or by another input's embeddings); then, in the corrupted run, restore the clean
  outputs of a window of layers' MLPs, attention blocks or whole layers at the
  constraint positions; a layer's causal effect is the restored probability of the
  correct answer (Meng et al. 2022's tracing, extended to images as in the paper);
- **editing** (:func:`batched_update`, :func:`edit_mlp`): ROME's closed form
  W' = W + (v* − W k*)(C⁻¹k*)ᵀ / (k*ᵀC⁻¹k*) on an MLP's output projection, with k* the
  projection's input at the constraint's last token, C the covariance of its inputs on
  ordinary text, and v* an output vector optimized so that the model gives the new
  answer (:func:`optimize_value`), written for many facts in one update — the MultEdit
  idea of editing the early causal MLP;
- **a small LLaVA-style model** (:class:`MiniLlava`): visual tokens from a frozen
  vision encoder's feature map, a trained projector, a frozen language model.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import nn

from .models import eager_attention

KINDS = ("layer", "mlp", "attn")


def layers(model) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM (Llama family), or of the language
    model inside a LLaVA-style one (``model.model.language_model.layers``)."""
    inner = getattr(model, "model", None)
    for holder in (inner, getattr(inner, "language_model", None)):
        if holder is not None and hasattr(holder, "layers"):
            return list(holder.layers)
    raise ValueError(f"{type(model).__name__}: causal tracing here needs a decoder with model.model.layers "
                     f"(Llama, Gemma, Qwen, ...) or model.model.language_model.layers (LLaVA)")


def traced_module(layer: nn.Module, kind: str) -> nn.Module:
    """The module whose output tracing records and restores: the decoder layer itself
    (for ``layer``: the residual stream *entering* it, so that layer 0's is the input
    embeddings — ROME's hidden state), its MLP, or its attention block."""
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: choose from {KINDS}")
    return {"layer": layer, "mlp": getattr(layer, "mlp", None), "attn": getattr(layer, "self_attn", None)}[kind]


def _main(output):
    return output[0] if isinstance(output, tuple) else output


def _with_main(output, main: torch.Tensor):
    return (main, *output[1:]) if isinstance(output, tuple) else main


@contextmanager
def _hooks(kind: str, modules_and_functions):
    """Hooks that see (and may replace) each module's traced tensor: the input hidden
    states for ``layer``, the output otherwise. ``function(tensor)`` returns the tensor
    to use, or None to leave it."""
    def output_hook(function):
        def hook(_module, _inputs, output):
            new = function(_main(output))
            return None if new is None else _with_main(output, new)
        return hook

    def input_hook(function):
        def hook(_module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            new = function(hidden)
            if new is None:
                return None
            if args:
                return (new, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": new}
        return hook

    if kind == "layer":
        handles = [m.register_forward_pre_hook(input_hook(f), with_kwargs=True) for m, f in modules_and_functions]
    else:
        handles = [m.register_forward_hook(output_hook(f)) for m, f in modules_and_functions]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def record(model, inputs_embeds: torch.Tensor, kind: str) -> list[torch.Tensor]:
    """Every layer's traced tensor (B, T, d) on one forward pass."""
    outputs = []
    modules = [traced_module(layer, kind) for layer in layers(model)]
    with _hooks(kind, [(m, lambda t: outputs.append(t.detach().clone())) for m in modules]):
        model(inputs_embeds=inputs_embeds)
    return outputs


@torch.no_grad()
def answer_probability(model, inputs_embeds: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """Probability of each row's answer token at the last position (B,), on the host."""
    logits = model(inputs_embeds=inputs_embeds).logits[:, -1].float()
    return logits.softmax(-1).gather(1, answer_ids.to(logits.device)[:, None])[:, 0].cpu()


@torch.no_grad()
def restored_probability(model, corrupted_embeds: torch.Tensor, clean_outputs: list[torch.Tensor], kind: str,
                         restore: list[int], positions: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """The corrupted run with the clean traced tensors of layers ``restore`` put back at
    ``positions`` (a (B, T) boolean mask); the answer's probability (B,)."""
    def put_back(index):
        def replace(tensor):
            tensor = tensor.clone()
            tensor[positions] = clean_outputs[index][positions].to(tensor.dtype)
            return tensor
        return replace

    all_layers = layers(model)
    with _hooks(kind, [(traced_module(all_layers[i], kind), put_back(i)) for i in restore]):
        return answer_probability(model, corrupted_embeds, answer_ids)


@dataclass
class Trace:
    """One causal trace: the clean and corrupted probabilities of the answer (B,) and the
    restored probability per (window start) layer (layers, B)."""

    kind: str
    window: int
    clean: np.ndarray
    corrupted: np.ndarray
    restored: np.ndarray
    # the prompt-mean effect a layer must exceed to count as causal (:func:`trace_setting`)
    floor: float = 0.0

    @property
    def effect(self) -> np.ndarray:
        """Indirect effect per layer, averaged over prompts: restored − corrupted."""
        return (self.restored - self.corrupted[None]).mean(1)


def window(start: int, size: int, n_layers: int) -> list[int]:
    """Layers ``start`` .. ``start + size − 1``, clipped to the model (the paper restores a
    window of consecutive layers around each position; we start it at ``start``)."""
    return list(range(start, min(start + size, n_layers)))


def by_rows(function, batch: int | None, *tensors: torch.Tensor) -> torch.Tensor:
    """``function(*tensors)`` on consecutive blocks of at most ``batch`` rows (all rows at
    once when ``batch`` is None or not smaller), the results concatenated: a 7B model
    holds every layer's states of a few ~600-token prompts, not of a hundred."""
    n = len(tensors[0])
    if not batch or n <= batch:
        return function(*tensors)
    return torch.cat([function(*(t[i:i + batch] for t in tensors)) for i in range(0, n, batch)])


def row_blocks(n: int, batch: int | None) -> list[slice]:
    """The row slices :func:`by_rows` uses (one slice of every row when ``batch`` is None)."""
    step = batch if batch and batch < n else n
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def causal_trace(model, clean_embeds: torch.Tensor, corrupted_embeds: torch.Tensor, positions: torch.Tensor,
                 answer_ids: torch.Tensor, kind: str = "mlp", size: int = 1, progress: str | None = None,
                 batch: int | None = None) -> Trace:
    """Restore each window of ``size`` layers in turn; see :class:`Trace`. ``batch``: prompts
    per forward pass (None: all), as each pass keeps every layer's clean states."""
    from tqdm.auto import tqdm

    if batch and len(clean_embeds) > batch:
        parts = [causal_trace(model, clean_embeds[rows], corrupted_embeds[rows], positions[rows], answer_ids[rows],
                              kind, size, progress) for rows in row_blocks(len(clean_embeds), batch)]
        return Trace(kind, size, *(np.concatenate([getattr(t, f) for t in parts], -1)
                                   for f in ("clean", "corrupted", "restored")))
    n = len(layers(model))
    clean_outputs = record(model, clean_embeds, kind)
    clean = answer_probability(model, clean_embeds, answer_ids).numpy()
    corrupted = answer_probability(model, corrupted_embeds, answer_ids).numpy()
    restored = np.stack([restored_probability(model, corrupted_embeds, clean_outputs, kind, window(l, size, n),
                                              positions, answer_ids).numpy()
                         for l in tqdm(range(n), desc=progress, disable=progress is None, leave=False)])
    return Trace(kind, size, clean, corrupted, restored)


def noise_corrupt(embeds: torch.Tensor, positions: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    """Gaussian noise of standard deviation ``scale`` added at ``positions`` (ROME's
    corruption uses 3 × the embeddings' standard deviation)."""
    generator = torch.Generator().manual_seed(seed)  # drawn on the host: the same noise on any device
    noise = (torch.randn(embeds.shape, generator=generator, dtype=embeds.dtype) * scale).to(embeds.device)
    return embeds + noise * positions[..., None].to(embeds.dtype)


def replace_corrupt(embeds: torch.Tensor, other: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The embeddings at ``positions`` replaced by another input's (same shape): e.g. the
    visual tokens of another image."""
    return torch.where(positions[..., None], other, embeds)


# ----------------------------------------------------------------------------- rank-one editing


def output_projection(layer: nn.Module) -> nn.Linear:
    """The MLP's last linear map (Llama: ``down_proj``), the matrix ROME edits."""
    mlp = layer.mlp
    for name in ("down_proj", "fc2", "c_proj"):
        if hasattr(mlp, name):
            return getattr(mlp, name)
    raise ValueError(f"{type(mlp).__name__}: no down_proj/fc2/c_proj to edit")


@torch.no_grad()
def projection_inputs(model, layer_index: int, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """The inputs (B, T, d_ff) of layer ``layer_index``'s MLP output projection."""
    seen = []
    proj = output_projection(layers(model)[layer_index])
    handle = proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().clone()))
    try:
        model(inputs_embeds=inputs_embeds)
    finally:
        handle.remove()
    return seen[0]


def key_covariance(keys: torch.Tensor, ridge: float = 1e-2) -> torch.Tensor:
    """C = E[k kᵀ] over many keys (N, d_ff) plus ``ridge`` × mean diagonal × I, so that C
    is invertible however few keys there are (ROME estimates it on Wikipedia text)."""
    keys = keys.double()
    return _with_ridge(keys.T @ keys / len(keys), ridge)


def _with_ridge(second_moment: torch.Tensor, ridge: float) -> torch.Tensor:
    c = second_moment.double()
    return (c + ridge * c.diagonal().mean() * torch.eye(len(c), dtype=c.dtype, device=c.device)).float()


def batched_update(weight: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, covariance: torch.Tensor
                   ) -> torch.Tensor:
    """Several edits in **one** update (MultEdit edits many facts at once): the smallest
    change in ROME's C-weighted sense with W' kᵢ = vᵢ for every key (rows of ``keys`` (n,
    d_in), ``values`` (n, d_out)):

        ΔW = (V − W K) (Kᵀ C⁻¹ K)⁻¹ (C⁻¹ K)ᵀ,   K = [k₁ … kₙ], V = [v₁ … vₙ]

    — ROME's eq. 2 with n constraints, and MEMIT's closed form (Meng et al. 2023, eq. 14)
    in its limit of exact insertion. For one key it is ROME's rank-one update
    W' = W + (v − W k)(C⁻¹k)ᵀ / (kᵀ C⁻¹ k); a key x with xᵀ C⁻¹ K = 0 is mapped as before."""
    w, k, v = weight.double(), keys.double().T, values.double().T  # (d_out, d_in), (d_in, n), (d_out, n)
    c_inv_k = torch.linalg.solve(covariance.double(), k)
    gram = k.T @ c_inv_k  # (n, n), symmetric
    # R G⁻¹ = (G⁻¹ Rᵀ)ᵀ since G is symmetric
    update = torch.linalg.solve(gram, (v - w @ k).T).T @ c_inv_k.T
    return (w + update).to(weight.dtype)


def optimize_value(model, layer_index: int, inputs_embeds: torch.Tensor, position: torch.Tensor,
                   target_ids: torch.Tensor, steps: int = 40, lr: float = 0.5, weight_decay: float = 1e-3,
                   seed: int = 0, groups: torch.Tensor | None = None, n_groups: int | None = None,
                   batch: int | None = None) -> torch.Tensor:
    """v*: the MLP output at ``position`` (B,) of layer ``layer_index`` that makes the model
    give ``target_ids`` (B,) at the last position — a δ added to the original outputs,
    optimized with Adam (ROME's second step, without its KL term); the mean over rows of
    original + δ. ``groups`` (B,) gives independent edits one δ each, optimized in one
    batch (each group's loss is its own mean, so this equals separate runs); the result is
    then (groups, d). ``batch``: rows per forward and backward pass, their gradients summed
    before each step (None: all rows at once)."""
    torch.manual_seed(seed)
    mlp = layers(model)[layer_index].mlp
    device = inputs_embeds.device
    position, target_ids = position.to(device), target_ids.to(device)
    rows = torch.arange(len(position), device=device)
    grouped = groups is not None
    groups = groups.to(device) if grouped else torch.zeros(len(position), dtype=torch.long, device=device)
    n_groups = n_groups or int(groups.max()) + 1
    counts = group_sizes(groups, n_groups)
    row_weight = 1.0 / counts[groups]
    original = by_rows(lambda e, at: record(model, e, "mlp")[layer_index][torch.arange(len(at), device=device), at],
                       batch, inputs_embeds, position)
    delta = torch.zeros(n_groups, original.shape[-1], requires_grad=True, device=device)
    optimizer = torch.optim.Adam([delta], lr=lr)
    blocks = row_blocks(len(position), batch)
    block = [blocks[0]]  # the rows of the forward pass in flight

    def add_delta(_module, _inputs, output):
        out = output.clone()
        at = rows[block[0]]
        out[at - at[0], position[at]] = out[at - at[0], position[at]] + delta[groups[at]]
        return out

    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    handle = mlp.register_forward_hook(add_delta)
    try:
        for _ in range(steps):
            optimizer.zero_grad()
            for first, rows_now in enumerate(blocks):
                block[0] = rows_now
                logits = model(inputs_embeds=inputs_embeds[block[0]]).logits[:, -1]
                losses = nn.functional.cross_entropy(logits.float(), target_ids[block[0]], reduction="none")
                loss = (losses * row_weight[block[0]]).sum()
                if first == 0:  # the decay once per step
                    loss = loss + weight_decay * delta.pow(2).sum()
                loss.backward()
            optimizer.step()
    finally:
        handle.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    values = torch.zeros(n_groups, original.shape[-1], device=device).index_add_(0, groups, original + delta.detach()[groups])
    values = values / counts[:, None]
    return values if grouped else values[0]


def group_sizes(groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """How many rows each group has (n_groups,), float32, on the groups' device: a bincount
    that needs no look at the values (none on a GPU, where that waits; none on ``meta``)."""
    return torch.zeros(n_groups, device=groups.device).index_add_(0, groups, torch.ones(len(groups), device=groups.device))


@torch.no_grad()
def edit_mlp(model, layer_index: int, key: torch.Tensor, value: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """Edit layer ``layer_index``'s MLP output projection in place so that the MLP maps
    ``key`` to ``value`` — one edit ((d_ff,), (d,)) or several at once ((n, d_ff), (n, d)),
    by :func:`batched_update`; the projection's bias, if any, is subtracted first. Returns
    the original weight (to undo the edit)."""
    proj = output_projection(layers(model)[layer_index])
    original = proj.weight.detach().clone()
    target = value - (proj.bias if proj.bias is not None else 0)
    keys, targets = (key[None], target[None]) if key.dim() == 1 else (key, target)
    proj.weight.copy_(batched_update(proj.weight, keys, targets, covariance))
    return original


@torch.no_grad()
def undo_edit(model, layer_index: int, original: torch.Tensor) -> None:
    output_projection(layers(model)[layer_index]).weight.copy_(original)


# ----------------------------------------------------------------------------- a small LLaVA-style model


class MiniLlava(nn.Module):
    """Visual tokens (B, N, vision_dim) from a frozen vision encoder, projected by a
    trained two-layer MLP into the language model's embedding space (LLaVA-1.5's
    projector) and placed between a text prefix and the question."""

    def __init__(self, language_model, tokenizer, vision_dim: int, projector: nn.Module | None = None):
        super().__init__()
        self.lm, self.tokenizer = language_model, tokenizer
        hidden = language_model.get_input_embeddings().weight.shape[1]
        self.projector = projector if projector is not None else nn.Sequential(
            nn.Linear(vision_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        for p in self.lm.parameters():
            p.requires_grad_(False)

    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    def text_embeds(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        return self.lm.get_input_embeddings()(ids.to(self.device))

    def embed(self, visual: torch.Tensor, before: str, after: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings [before, visual tokens, after] (B, T, d) and the (B, T) mask of
        the visual positions, on the language model's device (``visual`` may stay on the
        host) and in its precision."""
        b, n, _ = visual.shape
        head, tail = self.text_embeds(before), self.text_embeds(after)
        projected = self.projector(visual.to(self.device)).to(head.dtype)
        embeds = torch.cat([head.expand(b, -1, -1), projected, tail.expand(b, -1, -1)], 1)
        positions = torch.zeros(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        positions[:, len(head):len(head) + n] = True
        return embeds, positions


# ----------------------------------------------------------------------------- the chapter's experiment
#
# Entities whose identity must come from the image and whose facts the language model
# knows: countries, shown as their flags, asked for their capital.

# one worked example before every question (its country is never asked); three examples
# make a few more capitals known in text but double the prompt, and every pass costs
FEW_SHOT = "The capital of Japan is Tokyo.\n"
SHOT_COUNTRIES = ("Japan",)
# (text before the constraint, text after it): the country's name or its flag goes between
QUESTION = (FEW_SHOT + "The capital of", " is")
RECOGNITION = ("", " This flag belongs to")
REPHRASINGS = {"capital city": (FEW_SHOT + "The capital city of", " is"),
               "seat of government": (FEW_SHOT + "The seat of government of", " is")}
VISIONS = ("efficientnet-lite0", "own")

_BOOK = {
    "language_model": "smollm2-135m", "vision": "efficientnet-lite0", "n_countries": 40, "require_known": True,
    "single_token_names": True, "image_size": 128, "train_views": 8, "test_views": 2,
    "projector_steps": 160, "projector_lr": 1e-3, "projector_batch": 16,
    "n_trace": 6, "n_names": 12, "window": 3, "noise": 3.0, "noise_draws": 4, "attention_layers": 8, "ablate_k": [1, 2, 4, 8], "ablation_draws": 4,
    "n_edits": 12, "edit_layers": [0, 5, 15, 29], "edit_views": 2, "value_steps": 20, "value_lr": 0.5,
    "finetune_steps": 10, "finetune_lr": 1e-3, "specificity_flags": 20, "covariance_text": "moby-dick", "covariance_tokens": 8192,
    "bootstrap": 1000, "seed": 0, "threads": 2, "device": "cpu",
    # prompts per forward pass in traces, ablations and edits: the book's groups are smaller,
    # so each runs whole; a 7B model keeps every layer's states of only a few ~600-token prompts
    "forward_batch": 64,
}
PRESETS = {
    "smoke": {**_BOOK, "language_model": "tiny-llama", "n_countries": 8, "require_known": False,
              "single_token_names": False, "image_size": 64, "train_views": 2, "test_views": 1, "projector_steps": 4,
              "n_trace": 4, "n_names": 2, "noise_draws": 2, "attention_layers": 1, "ablate_k": [1, 2], "ablation_draws": 2, "n_edits": 2,
              "edit_layers": [0, 1], "edit_views": 1, "value_steps": 3, "finetune_steps": 3, "specificity_flags": 4,
              "covariance_text": "synthetic", "covariance_tokens": 512, "bootstrap": 50},
    "book": _BOOK,
    # LLaVA-1.5 with its own vision tower and projector (nothing trained); 32 layers; in
    # bfloat16 on the GPU when there is one
    "paper": {**_BOOK, "language_model": "llava-hf/llava-1.5-7b-hf", "vision": "own", "n_countries": 120,
              "image_size": 336, "projector_steps": 0, "n_trace": 120, "n_names": 120, "window": 5, "noise_draws": 10, "n_edits": 30,
              "edit_layers": [0, 2, 4, 6, 8, 12, 16, 20, 24, 28, 31], "specificity_flags": 119,
              "covariance_text": "wikitext-2-train",
              "covariance_tokens": 100000, "threads": 16, "device": "auto", "forward_batch": 8},
}

# what each parameter may be: checked before any model loads (config.resolve); not part
# of the chapter's code version, since a rule never changes a run it accepts
def parameter_rules():
    from . import models
    from .config import (at_paper, device, flag, folder, hub_id, integer, items, model, number, one_of, relation,
                         text_name)

    return {
        "language_model": model("causal-lm") | at_paper(hub_id()) | folder(),
        "vision": one_of(*VISIONS),
        "n_countries": integer(2),
        "require_known": flag(),
        "single_token_names": flag(),
        "image_size": integer(32, 1024),
        "train_views": integer(1),
        "test_views": integer(1),
        "projector_steps": integer(0),  # 0: the checkpoint's own projector (paper preset)
        "projector_lr": number(above=0, maximum=1),
        "projector_batch": integer(1),
        "n_trace": integer(1),  # at most: fewer when fewer views are answered right
        "n_names": integer(2),  # at most: countries with a name of several tokens, traced in text (two at least)
        "window": integer(1),
        "noise": number(above=0),
        "noise_draws": integer(2),  # two at least: the noise floor compares two halves of the draws
        "attention_layers": integer(1),
        "ablate_k": items(integer(1), increasing=True),
        "ablation_draws": integer(1),
        "n_edits": integer(1),  # at most, as n_trace
        "edit_layers": items(integer(0), increasing=True),
        "edit_views": integer(1),
        "value_steps": integer(1),
        "value_lr": number(above=0),
        "finetune_steps": integer(1),
        "finetune_lr": number(above=0, maximum=1),
        "specificity_flags": integer(1),  # at most: other countries' flags
        "covariance_text": text_name(),
        "covariance_tokens": integer(1),
        "bootstrap": integer(10),
        "seed": integer(0),
        "threads": integer(1),
        "device": device(),
        "forward_batch": integer(1),
        "own_vision_is_a_checkpoint": relation(
            "vision, language_model", "vision='own' needs a LLaVA checkpoint (a hub id at the paper preset or a "
            "folder); the book's vision encoder needs a registered language model",
            lambda v: (v["vision"] == "own") == (v["language_model"] not in models.REGISTRY)),
    }


@dataclass
class Country:
    name: str
    capital: str
    flag: np.ndarray  # RGB uint8
    answer_id: int  # the first token of " {capital}"
    name_id: int  # the first token of " {name}"


def candidate_countries(tokenizer, single_token_names: bool) -> list[Country]:
    """Every flag of ``data.country_flags`` whose country has a capital in the countryinfo
    package, with a plain name (no commas or brackets), minus the few-shot countries."""
    from countryinfo import CountryInfo

    from . import data

    out = []
    for _code, (name, flag) in data.country_flags().items():
        if name in SHOT_COUNTRIES or any(c in name for c in ",()"):
            continue
        try:
            capital = CountryInfo(name).capital()
        except Exception:  # countryinfo raises KeyError (and others) for names it lacks
            capital = None
        if not capital:
            continue
        name_ids = tokenizer(" " + name, add_special_tokens=False).input_ids
        if single_token_names and len(name_ids) != 1:
            continue
        out.append(Country(name, capital, flag, tokenizer(" " + capital, add_special_tokens=False).input_ids[0],
                           name_ids[0]))
    return out


def multi_token_countries(model, tokenizer, n: int, require_known: bool) -> list[Country]:
    """The first ``n`` candidate countries whose name is several tokens long (" Costa Rica")
    and, if ``require_known``, whose capital the language model gives in text: subjects of
    several tokens, which ROME traces at their last token. All of one length — the shortest
    that at least two countries qualify at (two tokens with SmolLM2's tokenizer; a
    byte-level tokenizer has none) — so that the prompts form one batch (tracing runs each
    length apart). Their flags play no part. Empty if no length has two."""
    by_length: dict[int, list[Country]] = {}
    for country in candidate_countries(tokenizer, single_token_names=False):
        length = len(tokenizer(" " + country.name, add_special_tokens=False).input_ids)
        if length > 1:
            by_length.setdefault(length, []).append(country)
    for length in sorted(by_length):
        chosen = by_length[length]
        if require_known:
            chosen = [c for c, k in zip(chosen, known_in_text(model, tokenizer, chosen)) if k]
        if len(chosen) >= 2:
            return chosen[:n]
    return []


def text_prompt(name: str, template: tuple[str, str] = QUESTION) -> str:
    return f"{template[0]} {name}{template[1]}"


@torch.no_grad()
def known_in_text(model, tokenizer, countries: list[Country], batch: int = 32) -> np.ndarray:
    """Whether the language model's greedy next token, asked in text, is the capital's first token."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    known = []
    for i in range(0, len(countries), batch):
        chunk = countries[i:i + batch]
        enc = tokenizer([text_prompt(c.name) for c in chunk], return_tensors="pt", padding=True, padding_side="left")
        predicted = model(**enc.to(model.device)).logits[:, -1].argmax(-1)
        known += [int(p) == c.answer_id for p, c in zip(predicted, chunk)]
    return np.array(known, dtype=bool)


def flag_views(flag: np.ndarray, n: int, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """``n`` square views (n, size, size, 3) uint8 of a flag padded onto white: a random crop
    of 80–100% of the side, brightness × 0.8–1.2 and pixel noise (σ = 8) per view; no
    augmentation when ``rng`` is None."""
    h, w, _ = flag.shape
    side = max(h, w)
    canvas = np.full((side, side, 3), 255, np.uint8)
    canvas[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = flag
    x = torch.as_tensor(canvas).permute(2, 0, 1).float()[None]
    views = []
    for _ in range(n):
        v = x
        if rng is not None:
            crop = int(side * rng.uniform(0.8, 1.0))
            top, left = rng.integers(0, side - crop + 1, 2)
            v = x[:, :, top:top + crop, left:left + crop] * float(rng.uniform(0.8, 1.2))
            v = v + torch.as_tensor(rng.normal(0, 8, v.shape), dtype=torch.float32)
        v = nn.functional.interpolate(v, size=(size, size), mode="bilinear", antialias=True)
        views.append(v.clamp(0, 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy())
    return np.stack(views)


class VisionLanguageModel:
    """The model under study: ``wrapper`` (a :class:`MiniLlava`: language model, tokenizer,
    projector) and ``features(views)`` — what the vision side gives the projector."""

    def __init__(self, wrapper: MiniLlava, features, trainable: bool, description: str):
        self.wrapper, self.features, self.trainable, self.description = wrapper, features, trainable, description

    @property
    def lm(self):
        return self.wrapper.lm

    @property
    def tokenizer(self):
        return self.wrapper.tokenizer


def load_model(cfg) -> VisionLanguageModel:
    """``language_model`` from the registry with ``vision`` = efficientnet-lite0 (frozen; its
    last feature map, one visual token per cell) and a new projector; or a local/hub LLaVA
    checkpoint with ``vision`` = own (its vision tower and projector, nothing trained)."""
    from . import models
    from .config import run_device

    if cfg.vision not in VISIONS:
        raise ValueError(f"vision={cfg.vision!r}: choose from {VISIONS}")
    device = run_device(cfg.device)
    if cfg.vision == "own":
        from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

        revision = models.source_revision(cfg.language_model)  # a hub id's pinned commit; a folder as it is
        try:  # bfloat16 on a GPU, as LLaVA-1.5 runs; float32 on the CPU, whose bfloat16 matmuls are slow
            model = LlavaForConditionalGeneration.from_pretrained(
                cfg.language_model, dtype=torch.bfloat16 if device == "cuda" else torch.float32,
                revision=revision).to(device)
        except OSError as error:
            raise OSError(f"language_model={cfg.language_model!r} is not available offline: download it where "
                          f"the hub can be reached (huggingface-cli download {cfg.language_model}) and set "
                          f"HF_HOME, or pass a local folder") from error
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(cfg.language_model, revision=revision)
        processor = AutoImageProcessor.from_pretrained(cfg.language_model, revision=revision)

        @torch.no_grad()
        def features(views: np.ndarray) -> torch.Tensor:
            pixels = processor(images=list(views), return_tensors="pt").pixel_values.to(model.device, model.dtype)
            return torch.stack(list(model.get_image_features(pixel_values=pixels).pooler_output)).float().cpu()

        wrapper = MiniLlava(model, tokenizer, model.get_input_embeddings().weight.shape[1], projector=nn.Identity())
        return VisionLanguageModel(wrapper, features, False, f"{cfg.language_model} with its own vision tower")
    if cfg.language_model not in models.REGISTRY:
        raise ValueError(f"language_model={cfg.language_model!r}: with vision={cfg.vision!r} choose a registry "
                         f"language model ({', '.join(n for n, s in models.REGISTRY.items() if s.kind == 'causal-lm')})")
    lm = models.load(cfg.language_model, device=device)
    encoder = models.load(cfg.vision, device=device).model.eval()

    @torch.no_grad()
    def features(views: np.ndarray) -> torch.Tensor:
        from .models import efficientnet_input

        cells = encoder.extract_features(efficientnet_input(views).to(device))
        return cells.flatten(2).transpose(1, 2).cpu()  # (B, cells, 1280), kept on the host

    wrapper = MiniLlava(lm.model.eval(), lm.tokenizer, encoder._conv_head.out_channels)
    wrapper.projector.to(device)
    return VisionLanguageModel(wrapper, features, True, f"{cfg.language_model} + {cfg.vision} + trained projector")


@dataclass
class FlagData:
    countries: list[Country]
    train_features: torch.Tensor  # (train_views × countries, cells, vision_dim)
    train_labels: np.ndarray
    test_features: torch.Tensor
    test_labels: np.ndarray
    test_views: np.ndarray  # uint8, for figures
    known_fraction: float  # of the candidates, how many the LM answers in text


def load_flags(vlm: VisionLanguageModel, cfg, progress: bool = True) -> FlagData:
    """The countries (the first ``n_countries`` the LM answers in text, if ``require_known``)
    and the vision side's features of ``train_views`` and ``test_views`` augmented views each."""
    from tqdm.auto import tqdm

    candidates = candidate_countries(vlm.tokenizer, cfg.single_token_names)
    known = known_in_text(vlm.lm, vlm.tokenizer, candidates)
    chosen = [c for c, k in zip(candidates, known) if k or not cfg.require_known][:cfg.n_countries]
    if len(chosen) < 4:
        raise ValueError(f"only {len(chosen)} countries qualify; lower n_countries or set require_known=False")
    rng = np.random.default_rng(cfg.seed)
    train, test = [], []
    for country in tqdm(chosen, desc="flag views", disable=not progress, leave=False):
        train.append(flag_views(country.flag, cfg.train_views, cfg.image_size, rng))
        test.append(flag_views(country.flag, cfg.test_views, cfg.image_size, rng))
    # view-major order: rows v·C + c
    train_views = np.stack(train, 1).reshape(-1, cfg.image_size, cfg.image_size, 3)
    test_views = np.stack(test, 1).reshape(-1, cfg.image_size, cfg.image_size, 3)
    batches = lambda views: torch.cat([vlm.features(views[i:i + 64]) for i in range(0, len(views), 64)])
    n = len(chosen)
    return FlagData(chosen, batches(train_views), np.tile(np.arange(n), cfg.train_views), batches(test_views),
                    np.tile(np.arange(n), cfg.test_views), test_views, float(known.mean()))


def warmup_cosine(step: int, steps: int, warmup: float = 0.05) -> float:
    """Learning-rate factor: linear warm-up over the first ``warmup`` of the steps, then
    cosine decay to 0 (LLaVA-1.5's projector pretraining schedule)."""
    ramp = max(1, round(warmup * steps))
    if step < ramp:
        return (step + 1) / ramp
    return 0.5 * (1 + math.cos(math.pi * (step - ramp) / max(1, steps - ramp)))


def train_projector(vlm: VisionLanguageModel, flags: FlagData, cfg, progress: bool = True) -> dict:
    """Train only the projector (the language model and vision encoder stay frozen) on two
    questions about every training view, alternating: "[flag] This flag belongs to" →
    the country's name and "[few-shot] The capital of [flag] is" → its capital (first
    tokens; LLaVA's instruction tuning has such factual questions). Cached outside the
    repo under a hash of the features, the settings, the questions and the training code."""
    import hashlib
    import time

    from tqdm.auto import tqdm

    from .paths import cached_torch, code_hash

    # AdamW at a constant 3e-3 was fragile: a 1e-6 change in the features moved held-out
    # recognition from 0.95 to 0.51. LLaVA's recipe (lr 1e-3, warm-up, cosine decay) plus
    # gradient clipping gave 0.94-0.98 over seeds and perturbations (design runs, see the chapter).
    projector = vlm.wrapper.projector
    if not vlm.trainable or cfg.projector_steps == 0:
        return {"training": "none (the model's own projector)", "seconds": 0.0, "losses": []}
    settings = (cfg.language_model, cfg.projector_steps, cfg.projector_lr, cfg.projector_batch, cfg.seed,
                [c.name for c in flags.countries])
    # the features stand for the flags, views and vision encoder; the code is what trains
    key = (hashlib.sha256(flags.train_features.numpy().tobytes()).hexdigest() + repr(settings)
           + repr((QUESTION, RECOGNITION)) + code_hash(train_projector, warmup_cosine, MiniLlava))

    def build():
        torch.manual_seed(cfg.seed)
        for layer in projector:
            if hasattr(layer, "reset_parameters"):
                layer.reset_parameters()
        rng = np.random.default_rng(cfg.seed)
        names = torch.tensor([c.name_id for c in flags.countries], device=vlm.wrapper.device)
        capitals = torch.tensor([c.answer_id for c in flags.countries], device=vlm.wrapper.device)
        tasks = [(RECOGNITION, names), (QUESTION, capitals)]
        optimizer = torch.optim.AdamW(projector.parameters(), lr=cfg.projector_lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(warmup_cosine, steps=cfg.projector_steps))
        losses, start = [], time.perf_counter()
        for step in tqdm(range(cfg.projector_steps), desc="projector", disable=not progress, leave=False):
            template, targets = tasks[step % 2]
            rows = rng.choice(len(flags.train_labels), min(cfg.projector_batch, len(flags.train_labels)), replace=False)
            embeds, _ = vlm.wrapper.embed(flags.train_features[rows], *template)
            logits = vlm.lm(inputs_embeds=embeds).logits[:, -1]
            loss = nn.functional.cross_entropy(logits.float(), targets[flags.train_labels[rows]])
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(projector.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(round(float(loss.detach()), 4))
        return {"state": {k: v.cpu() for k, v in projector.state_dict().items()}, "seconds": round(time.perf_counter() - start, 1), "losses": losses}

    saved, cached = cached_torch("mllmtrace", key, build)
    projector.load_state_dict(saved["state"])
    projector.eval()
    return {"training": "cached" if cached else "trained now", "seconds": saved["seconds"], "losses": saved["losses"]}


@torch.no_grad()
def predictions(vlm: VisionLanguageModel, features: torch.Tensor, template: tuple[str, str], batch: int = 64
                ) -> torch.Tensor:
    """Greedy next token after [before, visual tokens, after] for every row, on the host."""
    out = []
    for i in range(0, len(features), batch):
        embeds, _ = vlm.wrapper.embed(features[i:i + batch], *template)
        out.append(vlm.lm(inputs_embeds=embeds).logits[:, -1].argmax(-1).cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------- causal traces of both settings


def trace_rows(correct: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` test views answered right (tracing needs a clean run that knows the
    answer); the first ``n`` views whatever they answer if fewer than two are (smoke runs)."""
    right = np.flatnonzero(correct)[:n]
    return right if len(right) >= 2 else np.arange(min(n, len(correct)))


@dataclass
class Prompts:
    """Prompts of one setting as input embeddings, in groups of equal length: (embeds
    (B, T, d), constraint mask (B, T), answer ids (B,), row labels)."""

    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]]

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([g[3] for g in self.groups])


@torch.no_grad()
def visual_prompts(vlm: VisionLanguageModel, features: torch.Tensor, labels: np.ndarray, countries: list[Country],
                   template: tuple[str, str] = QUESTION) -> Prompts:
    embeds, positions = vlm.wrapper.embed(features, *template)
    answers = torch.tensor([countries[y].answer_id for y in labels], device=embeds.device)
    return Prompts([(embeds, positions, answers, labels)])


@torch.no_grad()
def name_prompts(vlm: VisionLanguageModel, labels: np.ndarray, countries: list[Country],
                 template: tuple[str, str] = QUESTION) -> Prompts:
    """The same question with the country's name in text; the constraint = the name's tokens."""
    tok, table = vlm.tokenizer, vlm.lm.get_input_embeddings()
    head = tok(template[0], add_special_tokens=False).input_ids
    tail = tok(template[1], add_special_tokens=False).input_ids
    by_length: dict[int, list] = {}
    for y in labels:
        name = tok(" " + countries[y].name, add_special_tokens=False).input_ids
        by_length.setdefault(len(name), []).append((head + name + tail, len(head), len(name), y))
    groups = []
    for rows in by_length.values():
        ids = torch.tensor([r[0] for r in rows], device=table.weight.device)
        positions = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
        for i, (_, start, n, _) in enumerate(rows):
            positions[i, start:start + n] = True
        labels_ = np.array([r[3] for r in rows])
        groups.append((table(ids), positions, torch.tensor([countries[y].answer_id for y in labels_], device=ids.device),
                       labels_))
    return Prompts(groups)


# Where a trace puts the clean state back (the constraint is always corrupted whole): at
# every constraint token at once, as the paper restores an image's visual tokens, or at the
# constraint's last token only — ROME's site for a subject of several tokens ("the last
# subject token"), where Meng et al. find the mid-layer MLPs that recall the fact
TRACE_SITES = ("joint", "last")


def restore_positions(positions: torch.Tensor, site: str) -> torch.Tensor:
    """The (B, T) mask a trace restores at: the constraint mask itself (``joint``) or its
    last True per row (``last``)."""
    if site not in TRACE_SITES:
        raise ValueError(f"site={site!r}: choose from {TRACE_SITES}")
    if site == "joint":
        return positions
    last = torch.zeros_like(positions)
    last[torch.arange(len(positions), device=positions.device), _last_visual_index(positions)] = True
    return last & positions


def trace_setting(model, prompts: Prompts, kind: str, size: int, noise: float, seed: int, draws: int = 1,
                  progress: str | None = None, site: str = "joint", batch: int | None = None) -> Trace:
    """:func:`causal_trace` of every group, the constraint corrupted by Gaussian noise of
    ``noise`` × the standard deviation of the constraint's embeddings (ROME's 3σ), averaged
    over ``draws`` independent noise draws per prompt (ROME averages ten), the clean state
    restored at the constraint's ``site`` (:func:`restore_positions`; the noise does not
    depend on the site, so two sites' traces share their corrupted runs). The trace's
    **noise floor** is the largest difference, at any layer, between the prompt-mean effect
    curves of two disjoint halves of the draws (the even and the odd ones): how far a layer's
    effect moves when only the noise is drawn again. Without a second draw it is 0. ``batch``:
    prompts per forward pass (:func:`causal_trace`); the noise is drawn per group, whatever it is."""
    sigma = float(torch.cat([e[p] for e, p, _, _ in prompts.groups]).std())
    per_draw = []
    for draw in range(draws):
        label = f"{progress} ({draw + 1}/{draws})" if progress and draws > 1 else progress
        traces = [causal_trace(model, e, noise_corrupt(e, p, noise * sigma, seed + i + 1000 * draw),
                               restore_positions(p, site), a, kind, size, label, batch)
                  for i, (e, p, a, _) in enumerate(prompts.groups)]
        per_draw.append(Trace(kind, size, *(np.concatenate([getattr(t, f) for t in traces], -1)
                                             for f in ("clean", "corrupted", "restored"))))
    half_effect = lambda half: np.mean([t.effect for t in half], 0)
    floor = float(np.abs(half_effect(per_draw[0::2]) - half_effect(per_draw[1::2])).max()) if draws > 1 else 0.0
    return Trace(kind, size, per_draw[0].clean, np.mean([t.corrupted for t in per_draw], 0),
                 np.mean([t.restored for t in per_draw], 0), floor)


def effect_center(restored: np.ndarray, corrupted: np.ndarray, floor: float = 0.0) -> float:
    """The effect-weighted mean layer Σ_l l · e_l / Σ_l e_l over the layers whose mean
    indirect effect e_l (of the window starting at l) exceeds ``floor`` (the trace's noise
    floor; 0: every positive effect); NaN when no layer does — a trace that is noise
    everywhere has no causal layer to place."""
    effect = (restored - corrupted[None]).mean(1)
    effect = np.where(effect > floor, effect, 0.0)
    return float((np.arange(len(effect)) * effect).sum() / effect.sum()) if effect.sum() > 0 else float("nan")


def center_difference(a: Trace, b: Trace, n_boot: int, seed: int) -> tuple[float, float, float]:
    """center(a) − center(b), each above its own noise floor, and its 95% bootstrap interval
    (prompts resampled within each; resamples in which a trace has no layer above its floor
    are left out). NaN throughout when either trace has no layer above its floor."""
    rng = np.random.default_rng(seed)
    point = effect_center(a.restored, a.corrupted, a.floor) - effect_center(b.restored, b.corrupted, b.floor)
    if np.isnan(point):
        return float("nan"), float("nan"), float("nan")
    draws = []
    for _ in range(n_boot):
        ia, ib = rng.integers(0, len(a.clean), len(a.clean)), rng.integers(0, len(b.clean), len(b.clean))
        draws.append(effect_center(a.restored[:, ia], a.corrupted[ia], a.floor)
                     - effect_center(b.restored[:, ib], b.corrupted[ib], b.floor))
    low, high = np.nanpercentile(draws, [2.5, 97.5])
    return point, float(low), float(high)


# ----------------------------------------------------------------------------- which visual tokens carry the image


@torch.no_grad()
def visual_attention(model, embeds: torch.Tensor, positions: torch.Tensor, n_layers: int) -> torch.Tensor:
    """How much the last position attends to each constraint position (B, N): attention
    weights summed over heads and the first ``n_layers`` layers (the paper ranks visual
    tokens by their attention contribution in the early causal layers)."""
    with eager_attention(model):
        attentions = model(inputs_embeds=embeds, output_attentions=True).attentions[:n_layers]
    last_row = torch.stack([a[:, :, -1].float().sum(1) for a in attentions]).sum(0)  # (B, T)
    return last_row[positions].reshape(len(embeds), -1)


@torch.no_grad()
def ablated_probability(model, embeds: torch.Tensor, positions: torch.Tensor, drop: torch.Tensor,
                        replacement: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """The answer's probability with the visual tokens chosen by ``drop`` (B, N) replaced by
    ``replacement`` (the mean visual token: mean-ablation)."""
    mask = torch.zeros_like(positions)
    mask[positions] = drop.reshape(-1)
    return answer_probability(model, torch.where(mask[..., None], replacement.to(embeds.device, embeds.dtype), embeds),
                              answer_ids)


def token_ablation(model, prompts: Prompts, replacement: torch.Tensor, n_layers: int, ks: list[int], draws: int,
                   seed: int, batch: int | None = None) -> dict:
    """For each k: the answer's probability with the top-k visual tokens by early-layer
    attention removed, and with k random ones (mean over ``draws``), per prompt; and how
    often each visual position is among the top k. ``batch``: prompts per forward pass
    (every layer's attention maps are held at once)."""
    (embeds, positions, answers, _), = prompts.groups
    scores = by_rows(lambda e, p: visual_attention(model, e, p, n_layers), batch, embeds, positions)

    def without(drop):  # the answer's probability with ``drop``'s visual tokens mean-ablated
        return by_rows(lambda e, p, d, a: ablated_probability(model, e, p, d, replacement, a),
                       batch, embeds, positions, drop, answers).numpy()

    order = scores.argsort(1, descending=True)
    rng = np.random.default_rng(seed)
    n_tokens = scores.shape[1]
    out = {"clean": by_rows(lambda e, a: answer_probability(model, e, a), batch, embeds, answers).numpy(),
           "top": {}, "random": {}, "top_counts": {}}
    for k in ks:
        drop = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, order[:, :k], True)
        out["top"][k] = without(drop)
        out["top_counts"][k] = drop.sum(0).cpu().numpy()
        random_runs = []
        for _ in range(draws):
            picks = torch.as_tensor(np.argsort(rng.random((len(embeds), n_tokens)), 1)[:, :k], device=scores.device)
            drop = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, picks, True)
            random_runs.append(without(drop))
        out["random"][k] = np.mean(random_runs, 0)
    return out


# ----------------------------------------------------------------------------- MultEdit: editing the causal MLP


@torch.no_grad()
def text_key_covariances(model, tokenizer, text: str, n_tokens: int, layer_indices: list[int],
                         length: int = 128, ridge: float = 1e-2) -> dict[int, torch.Tensor]:
    """C = E[k kᵀ] of each layer's MLP output-projection inputs over ``n_tokens`` tokens of
    ordinary text (ROME uses Wikipedia), accumulated in float64 without keeping the keys."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0][:n_tokens]
    ids = ids[:len(ids) // length * length].reshape(-1, length) if len(ids) >= length else ids[None]
    sums: dict[int, torch.Tensor] = {}
    count = [0]
    all_layers = layers(model)

    def accumulate(index):
        def hook(_module, args):
            k = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[index] = sums.get(index, 0) + k.T @ k
        return hook

    handles = [output_projection(all_layers[i]).register_forward_pre_hook(accumulate(i)) for i in layer_indices]
    try:
        for row in ids.split(8):
            model(input_ids=row.to(model.device))
            count[0] += row.numel()
    finally:
        for h in handles:
            h.remove()
    return {i: _with_ridge(s / count[0], ridge) for i, s in sums.items()}


@dataclass
class EditCase:
    """One edit: a country (``label``) gets another country's capital (``target``)."""

    label: int
    target: int  # token id
    edit_features: torch.Tensor  # the views the edit is made from
    test_features: torch.Tensor  # held-out views of the same flag


def _last_visual_index(positions: torch.Tensor) -> torch.Tensor:
    return positions.float().cumsum(1).argmax(1)  # the last True per row


# Where an edit reads its key (and writes its value): ROME's site, the constraint's last
# token (the last visual token here), or the prompt's final position — the only position
# at which an edit of the *last* layer can reach the answer in a causal decoder (at any
# earlier position the last layer's output feeds no later computation)
EDIT_SITES = ("constraint", "final")


def edit_positions(positions: torch.Tensor, site: str) -> torch.Tensor:
    """The position (B,) each row's edit reads its key at: the constraint's last token or
    the prompt's last one."""
    if site not in EDIT_SITES:
        raise ValueError(f"site={site!r}: choose from {EDIT_SITES}")
    if site == "constraint":
        return _last_visual_index(positions)
    return torch.full((len(positions),), positions.shape[1] - 1, device=positions.device)


def edit_metrics(vlm: VisionLanguageModel, case: EditCase, specificity: float) -> dict:
    """Efficacy (the edit views answer the new capital) and generalization (held-out views
    of the flag, under the question and its rephrasings), each a fraction, with the
    specificity measured for the whole update (:func:`edit_experiment`)."""
    hit = lambda features, template: (predictions(vlm, features, template) == case.target).float().mean().item()
    general = [hit(case.test_features, QUESTION)] + [hit(case.test_features, t) for t in REPHRASINGS.values()]
    return {"efficacy": hit(case.edit_features, QUESTION), "generalization": float(np.mean(general)),
            "specificity": specificity}


def edit_keys_and_values(vlm: VisionLanguageModel, cases: list[EditCase], layer: int, cfg,
                         template: tuple[str, str] = QUESTION, site: str = "constraint"
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """MultEdit's key and value for every case at ``layer`` (cases, d_ff) and (cases, d):
    the key is the MLP projection input at the edit ``site`` (:func:`edit_positions`; mean
    over the case's edit views), the value the MLP output there that makes the model answer
    the new capital (:func:`optimize_value`, all cases in one batch, one δ each)."""
    with torch.no_grad():
        embeds, positions = vlm.wrapper.embed(torch.cat([c.edit_features for c in cases]), *template)
    device = embeds.device
    groups = torch.cat([torch.full((len(c.edit_features),), i) for i, c in enumerate(cases)]).to(device)
    targets = torch.cat([torch.full((len(c.edit_features),), c.target) for c in cases]).to(device)
    at = edit_positions(positions, site)
    inputs = by_rows(lambda e, a: projection_inputs(vlm.lm, layer, e)[torch.arange(len(e), device=device), a],
                     cfg.forward_batch, embeds, at)
    keys = torch.zeros(len(cases), inputs.shape[-1], device=device).index_add_(0, groups, inputs.float())
    keys = keys / group_sizes(groups, len(cases))[:, None]
    values = optimize_value(vlm.lm, layer, embeds, at, targets, steps=cfg.value_steps, lr=cfg.value_lr,
                            seed=cfg.seed, groups=groups, n_groups=len(cases), batch=cfg.forward_batch)
    return keys, values


def rank_one_edit(vlm: VisionLanguageModel, cases: list[EditCase], layer: int, covariance: torch.Tensor, cfg,
                  template: tuple[str, str] = QUESTION, site: str = "constraint") -> torch.Tensor:
    """MultEdit: every case's key and value at ``layer``, applied in **one** update
    (:func:`batched_update`; ROME's rank-one form when there is one case). Returns the
    original weight."""
    keys, values = edit_keys_and_values(vlm, cases, layer, cfg, template, site)
    return edit_mlp(vlm.lm, layer, keys, values, covariance)


def finetune_edit(vlm: VisionLanguageModel, cases: list[EditCase], layer: int, cfg) -> torch.Tensor:
    """The baseline: fine-tune the same MLP output projection (unconstrained) on every
    case's edit views at once, each for its new answer; returns the original weight."""
    proj = output_projection(layers(vlm.lm)[layer])
    original = proj.weight.detach().clone()
    with torch.no_grad():
        embeds, _ = vlm.wrapper.embed(torch.cat([c.edit_features for c in cases]), *QUESTION)
    targets = torch.cat([torch.full((len(c.edit_features),), c.target) for c in cases]).to(embeds.device)
    proj.weight.requires_grad_(True)
    optimizer = torch.optim.Adam([proj.weight], lr=cfg.finetune_lr)
    try:
        for _ in range(cfg.finetune_steps):
            optimizer.zero_grad()
            for rows in row_blocks(len(embeds), cfg.forward_batch):  # the mean over all rows, block by block
                logits = vlm.lm(inputs_embeds=embeds[rows]).logits[:, -1].float()
                loss = nn.functional.cross_entropy(logits, targets[rows]) * ((rows.stop - rows.start) / len(embeds))
                loss.backward()
            optimizer.step()
    finally:
        proj.weight.requires_grad_(False)
    return original


def edit_cases(vlm: VisionLanguageModel, flags: FlagData, correct: np.ndarray, n_edits: int, edit_views: int,
               seed: int) -> list[EditCase]:
    """``n_edits`` countries whose flag the model answers right (on every test view): each
    gets the capital of the next chosen country (a counterfactual insertion), the edit made
    from ``edit_views`` training views and judged on the test views."""
    n = len(flags.countries)
    right = [c for c in range(n) if correct[flags.test_labels == c].all()] or list(range(n))  # (or: smoke runs)
    rng = np.random.default_rng(seed)
    chosen = list(rng.permutation(right)[:n_edits])
    cases = []
    for i, c in enumerate(chosen):
        other = chosen[(i + 1) % len(chosen)] if len(chosen) > 1 else (c + 1) % n
        cases.append(EditCase(int(c), flags.countries[other].answer_id,
                              flags.train_features[flags.train_labels == c][:edit_views],
                              flags.test_features[flags.test_labels == c]))
    return cases


def edit_arms(edit_layers: list[int], early_layer: int) -> list[tuple[str, int, str]]:
    """(method, layer, site) of every edit the chapter compares: MultEdit at each of
    ``edit_layers`` at the constraint's site, MultEdit at the last layer at the final
    position (the last layer's edit that *can* reach the answer), and fine-tuning of the
    early layer's MLP."""
    return ([("rank-one", layer, "constraint") for layer in edit_layers]
            + [("rank-one", max(edit_layers), "final"), ("fine-tune", early_layer, "constraint")])


def edit_experiment(vlm: VisionLanguageModel, flags: FlagData, cases: list[EditCase], arms: list[tuple[str, int, str]],
                    covariances: dict[int, torch.Tensor], cfg, progress: bool = True) -> list[dict]:
    """For every arm of :func:`edit_arms`: **all** cases edited in one update, then each
    case's efficacy and generalization and the update's specificity — the share of
    ``specificity_flags`` flags that no case edits (their first test view) whose answer is
    unchanged; the model is restored after each arm."""
    from tqdm.auto import tqdm

    edited = {case.label for case in cases}
    others = [c for c in range(len(flags.countries)) if c not in edited][:cfg.specificity_flags]
    first_view = np.array([np.flatnonzero(flags.test_labels == c)[0] for c in others], dtype=int)
    unedited = predictions(vlm, flags.test_features[first_view], QUESTION) if len(others) else None

    rows = []
    for method, layer, site in tqdm(arms, desc="edits", disable=not progress, leave=False):
        if method == "rank-one":
            original = rank_one_edit(vlm, cases, layer, covariances[layer], cfg, site=site)
        elif method == "fine-tune":
            original = finetune_edit(vlm, cases, layer, cfg)
        else:
            raise ValueError(f"method={method!r}: choose from rank-one, fine-tune")
        try:
            specificity = (float((predictions(vlm, flags.test_features[first_view], QUESTION) == unedited).float().mean())
                           if len(others) else float("nan"))
            for case in cases:
                rows.append({"country": flags.countries[case.label].name, "method": method, "layer": layer,
                             "site": site, **edit_metrics(vlm, case, specificity)})
        finally:
            undo_edit(vlm.lm, layer, original)
    return rows


def early_edit_layer(flag_mlp: Trace, edit_layers: list[int], n_layers: int, threshold: float = 0.10) -> int:
    """C3's "early causal MLP": the edit layer nearest the peak of the flag question's MLP
    trace if that trace has causal layers (its best window recovers ≥ ``threshold`` of the
    clean − corrupted gap, C1's first check); otherwise the edit layer nearest n_layers / 6,
    the middle of the network's first third (the paper finds LLaVA's at layers ~1–4 of 32)."""
    gap = max(float(flag_mlp.clean.mean() - flag_mlp.corrupted.mean()), 1e-9)
    anchor = int(flag_mlp.effect.argmax()) if flag_mlp.effect.max() / gap >= threshold else n_layers / 6
    return min(edit_layers, key=lambda l: (abs(l - anchor), l))


def mid_edit_layer(edit_layers: list[int], n_layers: int, early: int) -> int | None:
    """C3's mid-layer comparator: the edit layer nearest the network's middle, other than
    the early causal layer and the last edit layer (compared at the final position); None
    if there is none."""
    candidates = [l for l in edit_layers if l not in (early, max(edit_layers))]
    return min(candidates, key=lambda l: (abs(l - n_layers / 2), l)) if candidates else None
