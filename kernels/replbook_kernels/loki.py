"""Loki's two decoding-step kernels (chapter 08), each beside its torch reference.

Shapes follow one decoding step with grouped-query attention: query head ``h``
reads key/value head ``h // group``. The cache holds keys already rotated into
the PCA basis (``keys_pca = K P``), as Loki stores them.

(a) ``approx_scores``: scores from the first ``d`` PCA dimensions only,
        s̃[h, j] = Σ_{i<d} q_pca[h, i] · keys_pca[h // group, j, i]
(b) ``topk_attention``: exact attention over the selected keys and values only,
        out[h] = softmax_j(scale · q_pca[h] · keys_pca[g, idx[h, j]]) · values[g, idx[h, j]]
    computed in one pass with an online softmax (no gathered copy is written).
The top-k between them is ``torch.topk``.
"""
from __future__ import annotations

import torch

from .gathered_scores import triton, triton_available

if triton is not None:
    import triton.language as tl


def _check(q: torch.Tensor, keys: torch.Tensor) -> int:
    if q.dim() != 2 or keys.dim() != 3 or keys.shape[-1] != q.shape[-1]:
        raise ValueError(f"expected q [H, D] and keys [Hkv, S, D]; got {tuple(q.shape)}, {tuple(keys.shape)}")
    if q.shape[0] % keys.shape[0]:
        raise ValueError(f"query heads ({q.shape[0]}) must be a multiple of kv heads ({keys.shape[0]})")
    return q.shape[0] // keys.shape[0]


def _pow2(n: int) -> bool:
    return n > 0 and not n & (n - 1)


# ----------------------------------------------------------------------------- (a) approximate scores

def approx_scores_reference(q_pca: torch.Tensor, keys_pca: torch.Tensor, d: int) -> torch.Tensor:
    """[H, S] scores in the first d dimensions (fp32)."""
    group = _check(q_pca, keys_pca)
    keys = keys_pca.repeat_interleave(group, 0)[..., :d].float()
    return torch.einsum("hsd,hd->hs", keys, q_pca[:, :d].float())


if triton is not None:

    @triton.jit
    def approx_scores_kernel(q_ptr, keys_ptr, out_ptr, seq_len, group,
                             HEAD_DIM: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr):
        head = tl.program_id(0)
        block = tl.program_id(1)
        kv = head // group
        offs_s = block * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, D)  # only the first D of HEAD_DIM columns are read
        mask_s = offs_s < seq_len
        q = tl.load(q_ptr + head * HEAD_DIM + offs_d).to(tl.float32)
        k = tl.load(keys_ptr + (kv * seq_len + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=mask_s[:, None], other=0.0).to(tl.float32)
        tl.store(out_ptr + head * seq_len + offs_s, tl.sum(k * q[None, :], axis=1), mask=mask_s)


def approx_scores(q_pca: torch.Tensor, keys_pca: torch.Tensor, d: int, block_s: int = 128) -> torch.Tensor:
    """(a) on the triton kernel where it can run (d and D powers of two), else the reference."""
    group = _check(q_pca, keys_pca)
    head_dim = q_pca.shape[1]
    if not (triton_available(q_pca.device) and _pow2(d) and _pow2(head_dim) and d <= head_dim):
        return approx_scores_reference(q_pca, keys_pca, d)
    q_pca, keys_pca = q_pca.contiguous(), keys_pca.contiguous()
    n_heads, seq_len = q_pca.shape[0], keys_pca.shape[1]
    out = torch.empty(n_heads, seq_len, device=q_pca.device, dtype=torch.float32)
    approx_scores_kernel[(n_heads, triton.cdiv(seq_len, block_s))](
        q_pca, keys_pca, out, seq_len, group, HEAD_DIM=head_dim, D=d, BLOCK_S=block_s)
    return out


# ----------------------------------------------------------------------------- (b) attention over top-k

def topk_attention_reference(q_pca: torch.Tensor, keys_pca: torch.Tensor, values: torch.Tensor,
                             index: torch.Tensor, scale: float) -> torch.Tensor:
    """[H, D]: exact softmax attention of each head over its selected rows (fp32)."""
    group = _check(q_pca, keys_pca)
    kv = torch.arange(q_pca.shape[0], device=q_pca.device) // group
    k_sel = keys_pca[kv[:, None], index].float()  # [H, k, D]
    v_sel = values[kv[:, None], index].float()
    weights = (torch.einsum("hkd,hd->hk", k_sel, q_pca.float()) * scale).softmax(-1)
    return torch.einsum("hk,hkd->hd", weights, v_sel)


if triton is not None:

    @triton.jit
    def topk_attention_kernel(q_ptr, keys_ptr, values_ptr, index_ptr, max_ptr, sum_ptr, acc_ptr,
                              seq_len, n_selected, group, scale, n_chunks,
                              HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
        # one program = one head x one chunk of CHUNK selected keys (split-K, as in
        # flash-decoding): it writes its partial softmax (max, sum, weighted values)
        head = tl.program_id(0)
        chunk = tl.program_id(1)
        kv = head // group
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + head * HEAD_DIM + offs_d).to(tl.float32)
        running_max = tl.full((1,), float("-inf"), tl.float32)
        running_sum = tl.zeros((1,), tl.float32)
        acc = tl.zeros((HEAD_DIM,), tl.float32)
        for start in range(chunk * CHUNK, chunk * CHUNK + CHUNK, BLOCK_K):
            offs_k = start + tl.arange(0, BLOCK_K)
            mask_k = offs_k < n_selected
            rows = tl.load(index_ptr + head * n_selected + offs_k, mask=mask_k, other=0)
            base = (kv * seq_len + rows[:, None]) * HEAD_DIM + offs_d[None, :]
            k = tl.load(keys_ptr + base, mask=mask_k[:, None], other=0.0).to(tl.float32)
            v = tl.load(values_ptr + base, mask=mask_k[:, None], other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1) * scale
            s = tl.where(mask_k, s, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(s, axis=0))
            correction = tl.where(new_max == float("-inf"), 0.0, tl.exp(running_max - new_max))
            p = tl.where(mask_k, tl.exp(s - new_max), 0.0)
            running_sum = running_sum * correction + tl.sum(p, axis=0)
            acc = acc * correction + tl.sum(p[:, None] * v, axis=0)
            running_max = new_max
        slot = head * n_chunks + chunk
        tl.store(max_ptr + slot + tl.arange(0, 1), running_max)
        tl.store(sum_ptr + slot + tl.arange(0, 1), running_sum)
        tl.store(acc_ptr + slot * HEAD_DIM + offs_d, acc)


def combine_chunks(maxima: torch.Tensor, sums: torch.Tensor, accs: torch.Tensor) -> torch.Tensor:
    """Merge per-chunk partial softmaxes [H, C], [H, C], [H, C, D] into [H, D]."""
    top = maxima.max(-1, keepdim=True).values
    weight = torch.exp(maxima - top)  # empty chunks have max -inf: weight 0
    return (accs * weight[..., None]).sum(1) / (sums * weight).sum(-1, keepdim=True)


def topk_attention(q_pca: torch.Tensor, keys_pca: torch.Tensor, values: torch.Tensor, index: torch.Tensor,
                   scale: float, block_k: int = 64, chunk: int = 256) -> torch.Tensor:
    """(b) on the triton kernel where it can run (D a power of two), else the reference."""
    _check(q_pca, keys_pca)
    if values.shape != keys_pca.shape or index.dim() != 2 or index.shape[0] != q_pca.shape[0]:
        raise ValueError(f"values must match keys {tuple(keys_pca.shape)} and index be [H, k]; "
                         f"got {tuple(values.shape)}, {tuple(index.shape)}")
    head_dim = q_pca.shape[1]
    if not (triton_available(q_pca.device) and _pow2(head_dim)):
        return topk_attention_reference(q_pca, keys_pca, values, index, scale)
    if chunk % block_k:
        raise ValueError(f"chunk ({chunk}) must be a multiple of block_k ({block_k})")
    q_pca, keys_pca, values, index = (t.contiguous() for t in (q_pca, keys_pca, values, index))
    n_heads, n_selected = index.shape
    n_chunks = triton.cdiv(n_selected, chunk)
    maxima = torch.empty(n_heads, n_chunks, device=q_pca.device, dtype=torch.float32)
    sums = torch.empty_like(maxima)
    accs = torch.empty(n_heads, n_chunks, head_dim, device=q_pca.device, dtype=torch.float32)
    topk_attention_kernel[(n_heads, n_chunks)](
        q_pca, keys_pca, values, index, maxima, sums, accs, keys_pca.shape[1], n_selected,
        n_heads // keys_pca.shape[0], scale, n_chunks, HEAD_DIM=head_dim, BLOCK_K=block_k, CHUNK=chunk)
    return combine_chunks(maxima, sums, accs)


# ----------------------------------------------------------------------------- one decoding step

def loki_decode(q_pca: torch.Tensor, keys_pca: torch.Tensor, values: torch.Tensor, k: int, d: int,
                scale: float) -> torch.Tensor:
    """(a) → torch.topk → (b): one Loki decoding step on the kernels."""
    scores = approx_scores(q_pca, keys_pca, d)
    index = scores.topk(k, dim=-1, sorted=False).indices
    return topk_attention(q_pca, keys_pca, values, index, scale)
