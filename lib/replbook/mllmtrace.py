"""Information storage and transfer in multimodal LLMs (Basu et al., NeurIPS 2024,
arXiv 2406.04236; no official code found).

Three tools, for any transformers decoder with ``model.model.layers`` (Llama family):

- **causal tracing** (:func:`causal_trace`): run the prompt clean and with its
  *constraint* corrupted (the visual tokens of the image, or the tokens of a name, by
  noise or by another input's embeddings); then, in the corrupted run, restore the clean
  outputs of a window of layers' MLPs, attention blocks or whole layers at the
  constraint positions; a layer's causal effect is the restored probability of the
  correct answer (Meng et al. 2022's tracing, extended to images as in the paper);
- **rank-one editing** (:func:`rank_one_update`, :func:`edit_mlp`): ROME's closed form
  W' = W + (v* − W k*)(C⁻¹k*)ᵀ / (k*ᵀC⁻¹k*) on an MLP's output projection, with k* the
  projection's input at the constraint's last token, C the covariance of its inputs on
  ordinary text, and v* an output vector optimized so that the model gives the new
  answer (:func:`optimize_value`) — the MultEdit idea of editing the early causal MLP;
- **a small LLaVA-style model** (:class:`MiniLlava`): visual tokens from a frozen
  vision encoder's feature map, a trained projector, a frozen language model.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

KINDS = ("layer", "mlp", "attn")


def layers(model) -> list[nn.Module]:
    """The decoder layers of a transformers causal LM (Llama family)."""
    try:
        return list(model.model.layers)
    except AttributeError:
        raise ValueError(f"{type(model).__name__}: causal tracing here needs a decoder with model.model.layers "
                         f"(Llama, Gemma, Qwen, ...)") from None


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
    """Probability of each row's answer token at the last position (B,)."""
    logits = model(inputs_embeds=inputs_embeds).logits[:, -1].float()
    return logits.softmax(-1).gather(1, answer_ids[:, None])[:, 0]


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

    @property
    def effect(self) -> np.ndarray:
        """Indirect effect per layer, averaged over prompts: restored − corrupted."""
        return (self.restored - self.corrupted[None]).mean(1)


def window(start: int, size: int, n_layers: int) -> list[int]:
    """Layers ``start`` .. ``start + size − 1``, clipped to the model (the paper restores a
    window of consecutive layers around each position; we start it at ``start``)."""
    return list(range(start, min(start + size, n_layers)))


def causal_trace(model, clean_embeds: torch.Tensor, corrupted_embeds: torch.Tensor, positions: torch.Tensor,
                 answer_ids: torch.Tensor, kind: str = "mlp", size: int = 1, progress: str | None = None) -> Trace:
    """Restore each window of ``size`` layers in turn; see :class:`Trace`."""
    from tqdm.auto import tqdm

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
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(embeds.shape, generator=generator, dtype=embeds.dtype) * scale
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
    c = keys.T @ keys / len(keys)
    return (c + ridge * c.diagonal().mean() * torch.eye(len(c), dtype=c.dtype)).float()


def rank_one_update(weight: torch.Tensor, key: torch.Tensor, value: torch.Tensor, covariance: torch.Tensor
                    ) -> torch.Tensor:
    """ROME's closed form (Meng et al. 2022, eq. 2) for a linear map ``out = W @ k``:
    W' = W + (v − W k)(C⁻¹k)ᵀ / (kᵀ C⁻¹ k), the smallest change (in the C-weighted sense)
    with W' k = v."""
    w, k, v = weight.double(), key.double(), value.double()
    c_inv_k = torch.linalg.solve(covariance.double(), k)
    update = torch.outer(v - w @ k, c_inv_k) / (k @ c_inv_k)
    return (w + update).to(weight.dtype)


def optimize_value(model, layer_index: int, inputs_embeds: torch.Tensor, position: torch.Tensor,
                   target_ids: torch.Tensor, steps: int = 40, lr: float = 0.5, weight_decay: float = 1e-3,
                   seed: int = 0) -> torch.Tensor:
    """v*: the MLP output at ``position`` (B,) of layer ``layer_index`` that makes the model
    give ``target_ids`` (B,) at the last position — a shared δ added to the original
    outputs, optimized with Adam (ROME's second step, without its KL term)."""
    torch.manual_seed(seed)
    mlp = layers(model)[layer_index].mlp
    rows = torch.arange(len(position))
    original = record(model, inputs_embeds, "mlp")[layer_index][rows, position]
    delta = torch.zeros(original.shape[-1], requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr)

    def add_delta(_module, _inputs, output):
        out = output.clone()
        out[rows, position] = out[rows, position] + delta
        return out

    params = [p for p in model.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    handle = mlp.register_forward_hook(add_delta)
    try:
        for _ in range(steps):
            logits = model(inputs_embeds=inputs_embeds).logits[:, -1]
            loss = nn.functional.cross_entropy(logits, target_ids) + weight_decay * delta.pow(2).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        handle.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return (original + delta.detach()).mean(0)


@torch.no_grad()
def edit_mlp(model, layer_index: int, key: torch.Tensor, value: torch.Tensor, covariance: torch.Tensor) -> torch.Tensor:
    """Apply :func:`rank_one_update` to layer ``layer_index``'s MLP output projection in
    place, so that the MLP's output for ``key`` is ``value`` (the projection's bias, if
    any, is subtracted first); returns the original weight (to undo the edit)."""
    proj = output_projection(layers(model)[layer_index])
    original = proj.weight.detach().clone()
    target = value - (proj.bias if proj.bias is not None else 0)
    proj.weight.copy_(rank_one_update(proj.weight, key, target, covariance))
    return original


@torch.no_grad()
def undo_edit(model, layer_index: int, original: torch.Tensor) -> None:
    output_projection(layers(model)[layer_index]).weight.copy_(original)


# ----------------------------------------------------------------------------- a small LLaVA-style model


class MiniLlava(nn.Module):
    """Visual tokens (B, N, vision_dim) from a frozen vision encoder, projected by a
    trained two-layer MLP into the language model's embedding space (LLaVA-1.5's
    projector) and placed between a text prefix and the question."""

    def __init__(self, language_model, tokenizer, vision_dim: int):
        super().__init__()
        self.lm, self.tokenizer = language_model, tokenizer
        hidden = language_model.get_input_embeddings().weight.shape[1]
        self.projector = nn.Sequential(nn.Linear(vision_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        for p in self.lm.parameters():
            p.requires_grad_(False)

    def text_embeds(self, text: str) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        return self.lm.get_input_embeddings()(ids)

    def embed(self, visual: torch.Tensor, before: str, after: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Input embeddings [before, visual tokens, after] (B, T, d) and the (B, T) mask of
        the visual positions."""
        b, n, _ = visual.shape
        head, tail = self.text_embeds(before), self.text_embeds(after)
        projected = self.projector(visual)
        embeds = torch.cat([head.expand(b, -1, -1), projected, tail.expand(b, -1, -1)], 1)
        positions = torch.zeros(embeds.shape[:2], dtype=torch.bool)
        positions[:, len(head):len(head) + n] = True
        return embeds, positions
