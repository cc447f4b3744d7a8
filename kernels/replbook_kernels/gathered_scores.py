"""Gathered dot products: the score of a query against a chosen subset of keys.

For each head h and each selected position j = index[h, i]:

    scores[h, i] = sum_d  q[h, d] * keys[h, j, d]

This is the inner step of top-k sparse attention (Loki, chapter 08: score only
the keys that were selected), written once here as the pattern for the book's
kernels: a plain-torch reference and a triton kernel of the same function.
"""
from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is pinned in requirements.txt
    triton = None


def triton_available(device: torch.device | str) -> bool:
    """Triton runs compiled on a CUDA device, or interpreted on the CPU with TRITON_INTERPRET=1."""
    if triton is None:
        return False
    if torch.device(device).type == "cuda":
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def _check(q: torch.Tensor, keys: torch.Tensor, index: torch.Tensor, bounds: bool = True) -> None:
    if q.dim() != 2 or keys.dim() != 3 or index.dim() != 2:
        raise ValueError(f"expected q [H, D], keys [H, S, D], index [H, K]; got "
                         f"{tuple(q.shape)}, {tuple(keys.shape)}, {tuple(index.shape)}")
    if keys.shape[0] != q.shape[0] or keys.shape[2] != q.shape[1] or index.shape[0] != q.shape[0]:
        raise ValueError(f"shapes disagree: q {tuple(q.shape)}, keys {tuple(keys.shape)}, index {tuple(index.shape)}")
    # the bounds check reads the index on the host: a GPU sync, so timing loops skip it
    if bounds and index.numel() and (int(index.min()) < 0 or int(index.max()) >= keys.shape[1]):
        raise IndexError(f"index must lie in [0, {keys.shape[1]}), got [{int(index.min())}, {int(index.max())}]")


def gathered_scores_reference(q: torch.Tensor, keys: torch.Tensor, index: torch.Tensor,
                              check_bounds: bool = True) -> torch.Tensor:
    """Plain torch: gather the selected keys, then a batched dot product. Returns [H, K] in fp32."""
    _check(q, keys, index, check_bounds)
    picked = keys.gather(1, index[..., None].expand(-1, -1, keys.shape[-1]))  # [H, K, D]
    return torch.einsum("hkd,hd->hk", picked.float(), q.float())


if triton is not None:

    @triton.jit
    def gathered_scores_kernel(q_ptr, keys_ptr, index_ptr, out_ptr,
                               n_selected, seq_len,
                               HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr):
        # one program = one head x one block of BLOCK_K selected keys
        head = tl.program_id(0)
        block = tl.program_id(1)
        offs_k = block * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_d = tl.arange(0, HEAD_DIM)
        mask_k = offs_k < n_selected
        rows = tl.load(index_ptr + head * n_selected + offs_k, mask=mask_k, other=0)
        q = tl.load(q_ptr + head * HEAD_DIM + offs_d).to(tl.float32)
        key_ptrs = keys_ptr + (head * seq_len + rows[:, None]) * HEAD_DIM + offs_d[None, :]
        k = tl.load(key_ptrs, mask=mask_k[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(k * q[None, :], axis=1)
        tl.store(out_ptr + head * n_selected + offs_k, scores, mask=mask_k)


def gathered_scores(q: torch.Tensor, keys: torch.Tensor, index: torch.Tensor, block_k: int = 64,
                    check_bounds: bool = True) -> torch.Tensor:
    """Scores of ``q`` against ``keys[h, index[h]]``: the triton kernel where it can run,
    else the torch reference. The head dimension must be a power of two for the kernel."""
    _check(q, keys, index, check_bounds)
    head_dim = q.shape[1]
    if not triton_available(q.device) or head_dim & (head_dim - 1):
        return gathered_scores_reference(q, keys, index, check_bounds=False)
    q, keys, index = q.contiguous(), keys.contiguous(), index.contiguous()
    n_heads, n_selected = index.shape
    out = torch.empty(n_heads, n_selected, device=q.device, dtype=torch.float32)
    grid = (n_heads, triton.cdiv(n_selected, block_k))
    gathered_scores_kernel[grid](q, keys, index, out, n_selected, keys.shape[1],
                                 HEAD_DIM=head_dim, BLOCK_K=block_k)
    return out


def benchmark(n_heads: int = 32, seq_len: int = 16384, head_dim: int = 128, k_fraction: float = 0.25,
              dtype: torch.dtype = torch.float16, device: str = "cuda", repeats: int = 50,
              block_k: int = 64) -> dict:
    """Time kernel vs reference on a GPU and report the fraction of memory bandwidth used
    (the kernel reads the selected keys once; that is its roofline)."""
    torch.manual_seed(0)
    q = torch.randn(n_heads, head_dim, device=device, dtype=dtype)
    keys = torch.randn(n_heads, seq_len, head_dim, device=device, dtype=dtype)
    n_sel = int(seq_len * k_fraction)
    index = torch.stack([torch.randperm(seq_len, device=device)[:n_sel] for _ in range(n_heads)])
    ms = {}
    def kernel(*args, **kwargs):
        return gathered_scores(*args, block_k=block_k, **kwargs)

    for name, fn in [("triton", kernel), ("torch", gathered_scores_reference)]:
        fn(q, keys, index, check_bounds=False)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(repeats):
            fn(q, keys, index, check_bounds=False)
        end.record()
        torch.cuda.synchronize()
        ms[name] = start.elapsed_time(end) / repeats
    bytes_moved = n_heads * n_sel * (head_dim * keys.element_size() + index.element_size() + 4)
    err = (gathered_scores(q, keys, index) - gathered_scores_reference(q, keys, index)).abs().max().item()
    return {"triton_ms": ms["triton"], "torch_ms": ms["torch"], "speedup": ms["torch"] / ms["triton"],
            "triton_GBps": bytes_moved / ms["triton"] / 1e6, "max_abs_err": err,
            "shape": dict(n_heads=n_heads, seq_len=seq_len, head_dim=head_dim, k_fraction=k_fraction),
            "block_k": block_k}
