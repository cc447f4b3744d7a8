"""Language-model evaluation shared by the chapters that prune or approximate a
causal LM (04 Endor, 08 Loki): token windows of running text and perplexity."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def token_windows(tokenizer, text: str, window: int, count: int, offset_chars: int = 0,
                  start_with_bos: bool = False) -> list[torch.Tensor]:
    """``count`` consecutive non-overlapping windows of ``window`` tokens from ``text``.
    With ``start_with_bos`` every window begins with the tokenizer's BOS token, as a
    document would (Gemma's perplexity is several times worse on windows without it);
    otherwise the tokenizer's own special tokens appear once, at the start."""
    passage = text[offset_chars:offset_chars + 40 * window * count]
    if start_with_bos and tokenizer.bos_token_id is None:
        raise ValueError("start_with_bos=True but the tokenizer has no BOS token")
    ids = tokenizer(passage, add_special_tokens=not start_with_bos, return_tensors="pt").input_ids[0]
    step = window - 1 if start_with_bos else window
    if len(ids) < step * count:
        raise ValueError(f"text too short: {len(ids)} tokens for {count} windows of {window}")
    windows = [ids[i * step:(i + 1) * step] for i in range(count)]
    if start_with_bos:
        windows = [torch.cat([torch.tensor([tokenizer.bos_token_id]), w]) for w in windows]
    return windows


def model_windows(tokenizer, text: str, window: int, count: int, offset_chars: int = 0) -> list[torch.Tensor]:
    """:func:`token_windows` that start the way the model expects a document to: with its
    BOS token wherever the tokenizer defines one (Gemma's perplexity is ~1.5× worse on windows
    that lack it). The one helper chapters 04 and 08 cut their evaluation text with."""
    return token_windows(tokenizer, text, window, count, offset_chars=offset_chars,
                         start_with_bos=tokenizer.bos_token_id is not None)


@torch.no_grad()
def perplexity(model, windows: list[torch.Tensor]) -> float:
    """exp(mean next-token negative log-likelihood) over all windows."""
    nll, n = 0.0, 0
    for ids in windows:
        logits = model(ids[None].to(model.device)).logits[0, :-1].float().cpu()
        nll += F.cross_entropy(logits, ids[1:], reduction="sum").item()
        n += len(ids) - 1
    return math.exp(nll / n)
