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

A second path selects without sorting (on the H200 record, faster than the first from
16k tokens on, slower below: it has more launches):

(c) ``kth_largest``: each head's k-th largest approximate score, by a radix select over
    the scores' bit patterns (four histogram passes of 8 bits, many programs a row);
(d) ``threshold_attention``: exact attention over the keys whose approximate score is
    at least that threshold: each chunk of positions compacts its selected positions,
    then attends to them densely with an online softmax, and ``combine_partials``
    merges the chunks in one more launch.
Keys whose approximate score *ties* the k-th largest are all kept, so (d) may attend
to more than k keys where ``torch.topk`` would pick among the tied ones arbitrarily.
``select_in_one=True`` runs (c)'s last three passes and (d)'s compaction as one launch,
one program a row that counts each pass over the whole row (``select_compact_kernel``):
four launches in all, not seven, at the price of fewer programs for that part; which is
faster where is for a GPU record to say (not measured yet).

A third path does the whole step in one launch, for short contexts (up to
``FUSED_MAX_CONTEXT`` keys), where the launches of (a) → (c) → (d) (seven, or four) are the cost:

(e) ``loki_decode_fused``: one program a query head computes its approximate scores into a
    scratch row, sorts the row in registers for the k-th largest, and attends to the keys at
    or above it with an online softmax (the same keys as (c) → (d), ties kept).
``per_kv_head=True`` makes one selection per key/value head under grouped-query attention:
the group's query heads share the k keys ranked highest by their summed query,
(Σ_h q_h)·k in the first d dimensions, so (c) runs on Hkv rows and each selected key is
read for one group, not once per query head (chapter 08 measures what the same choice does
to perplexity, ``loki.select_topk(..., scope="kv_head")``; its speed on a GPU is not measured yet).
(a) also reads keys stored with their first d PCA dimensions apart and contiguous
(``keys_lead = keys_pca[..., :d].contiguous()``), as a cache laid out for Loki would.
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
    def approx_scores_kernel(q_ptr, keys_ptr, out_ptr, hist_ptr, seq_len, group, q_stride, key_stride,
                             D: tl.constexpr, BLOCK_S: tl.constexpr, FIRST_PASS: tl.constexpr):
        head = tl.program_id(0)
        block = tl.program_id(1)
        kv = head // group
        offs_s = block * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, D)  # only the first D columns of each row are read
        mask_s = offs_s < seq_len
        q = tl.load(q_ptr + head * q_stride + offs_d).to(tl.float32)
        k = tl.load(keys_ptr + (kv * seq_len + offs_s[:, None]).to(tl.int64) * key_stride + offs_d[None, :],
                    mask=mask_s[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(k * q[None, :], axis=1)
        tl.store(out_ptr + head.to(tl.int64) * seq_len + offs_s, scores, mask=mask_s)
        if FIRST_PASS:  # the radix select's first histogram (each key's top byte), counted while the scores are here
            bins = tl.arange(0, 512)
            top = tl.where(mask_s, (_radix_key(scores) >> 24).to(tl.int32), 256)
            tl.atomic_add(hist_ptr + head * 256 + bins, tl.histogram(top, 512), mask=bins < 256)


def approx_scores(q_pca: torch.Tensor, keys_pca: torch.Tensor, d: int, block_s: int = 128,
                  first_histogram: torch.Tensor | None = None) -> torch.Tensor:
    """(a) on the triton kernel where it can run (d a power of two), else the reference.
    ``keys_pca`` may hold every dimension [Hkv, S, D] or only the first d, stored apart
    ([Hkv, S, d], contiguous: a quarter of the bytes per row at d = D/4).
    ``first_histogram`` ([passes, H, 256] int32, zeros): the radix select's first pass is
    added into its ``[0]`` with the scores, saving (c) a launch and a read of them."""
    if keys_pca.dim() == 3 and keys_pca.shape[-1] == d < q_pca.shape[-1]:  # the lead dimensions, stored apart
        return approx_scores(q_pca[:, :d], keys_pca, d, block_s, first_histogram)
    group = _check(q_pca, keys_pca)
    if first_histogram is not None and (first_histogram.shape != (RADIX_PASSES, q_pca.shape[0], 256)
                                        or first_histogram.dtype != torch.int32):
        raise ValueError(f"first_histogram must be int32 [{RADIX_PASSES}, {q_pca.shape[0]}, 256]; "
                         f"got {first_histogram.dtype} {tuple(first_histogram.shape)}")
    if not (triton_available(q_pca.device) and _pow2(d) and d <= q_pca.shape[1]):
        scores = approx_scores_reference(q_pca, keys_pca, d)
        if first_histogram is not None:
            first_histogram[0] += _top_byte_counts(scores)
        return scores
    keys_pca = keys_pca.contiguous()
    if q_pca.stride(1) != 1:
        q_pca = q_pca.contiguous()
    n_heads, seq_len = q_pca.shape[0], keys_pca.shape[1]
    out = torch.empty(n_heads, seq_len, device=q_pca.device, dtype=torch.float32)
    approx_scores_kernel[(n_heads, triton.cdiv(seq_len, block_s))](
        q_pca, keys_pca, out, out if first_histogram is None else first_histogram, seq_len, group, q_pca.stride(0),
        keys_pca.shape[2], D=d, BLOCK_S=block_s, FIRST_PASS=first_histogram is not None)
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
    def _attend_rows(q, keys_ptr, values_ptr, rows, used, kv, seq_len, scale, running_max, running_sum, acc,
                     HEAD_DIM: tl.constexpr):
        # one block of rows into a running (online) softmax: exact scores, then the max,
        # the sum of weights and the weighted values, each rescaled to the new max
        offs_d = tl.arange(0, HEAD_DIM)
        base = (kv * seq_len + rows[:, None]).to(tl.int64) * HEAD_DIM + offs_d[None, :]
        k = tl.load(keys_ptr + base, mask=used[:, None], other=0.0).to(tl.float32)
        v = tl.load(values_ptr + base, mask=used[:, None], other=0.0).to(tl.float32)
        s = tl.where(used, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(s, axis=0))
        correction = tl.where(new_max == float("-inf"), 0.0, tl.exp(running_max - new_max))
        p = tl.where(used, tl.exp(s - new_max), 0.0)
        return new_max, running_sum * correction + tl.sum(p, axis=0), acc * correction + tl.sum(p[:, None] * v, axis=0)

    @triton.jit
    def _store_partial(max_ptr, sum_ptr, acc_ptr, slot, running_max, running_sum, acc, HEAD_DIM: tl.constexpr):
        tl.store(max_ptr + slot + tl.arange(0, 1), running_max)
        tl.store(sum_ptr + slot + tl.arange(0, 1), running_sum)
        tl.store(acc_ptr + slot * HEAD_DIM + tl.arange(0, HEAD_DIM), acc)

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
            running_max, running_sum, acc = _attend_rows(q, keys_ptr, values_ptr, rows, mask_k, kv, seq_len, scale,
                                                         running_max, running_sum, acc, HEAD_DIM)
        _store_partial(max_ptr, sum_ptr, acc_ptr, head * n_chunks + chunk, running_max, running_sum, acc, HEAD_DIM)


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


# ----------------------------------------------------------------------------- (c) the k-th largest score

def kth_largest_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[H]: each row's k-th largest value (fp32)."""
    return scores.float().topk(k, dim=-1).values[:, -1]


# Radix select. An fp32 x maps to an unsigned 32-bit key in the same order (_radix_key): flip
# the 31 low bits of negatives (so more negative is smaller), then add 2^31. Four passes fix the key's
# bytes from the top. Pass p counts, in a 256-bin histogram per head, the next byte of the
# keys that agree with the bytes fixed so far; many programs share a head's row and add
# their counts atomically. The byte kept is where the count from the top reaches the rank
# still wanted. Every kernel that needs the bytes fixed so far re-derives them from the
# histograms of the passes before (256 numbers a pass): no launch of its own.
RADIX_PASSES = 4

def _top_byte_counts(scores: torch.Tensor) -> torch.Tensor:
    """[H, 256] int32: the first radix pass in torch, each row's count of its keys' top byte."""
    bits = scores.float().contiguous().view(torch.int32)
    top = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) + 2 ** 31) >> 24
    counts = torch.zeros(scores.shape[0], 256, dtype=torch.int32, device=scores.device)
    return counts.scatter_add_(1, top, torch.ones_like(top, dtype=torch.int32))


if triton is not None:

    @triton.jit
    def _radix_key(x):
        bits = x.to(tl.int32, bitcast=True)
        return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64) + 2147483648

    @triton.jit
    def _radix_prefix(hist_ptr, head, n_heads, k, PASSES: tl.constexpr):
        bins = tl.arange(0, 256)
        prefix = tl.zeros((1,), tl.int64)
        remaining = tl.zeros((1,), tl.int32) + k
        for step in tl.static_range(PASSES):
            hist = tl.load(hist_ptr + (step * n_heads + head) * 256 + bins)
            at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # keys with byte >= b
            chosen = tl.max(tl.where(at_or_above >= remaining, bins, -1), axis=0)
            remaining -= tl.sum(tl.where(bins > chosen, hist, 0), axis=0)
            prefix = prefix | (chosen.to(tl.int64) << (24 - 8 * step))
        return prefix

    @triton.jit
    def _float_of_key(ordered_key):
        key = (ordered_key - 2147483648).to(tl.int32)
        bits = key ^ ((key >> 31) & 0x7FFFFFFF)  # the same flip undoes itself
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _radix_threshold(hist_ptr, head, n_heads, k):
        return _float_of_key(_radix_prefix(hist_ptr, head, n_heads, k, 4))

    @triton.jit
    def radix_histogram_kernel(scores_ptr, hist_ptr, seq_len, n_heads, k, split,
                               PASS: tl.constexpr, BLOCK: tl.constexpr):
        head = tl.program_id(0)
        part = tl.program_id(1)  # this program counts scores [part·split, (part+1)·split)
        shift = 24 - 8 * PASS
        prefix = _radix_prefix(hist_ptr, head, n_heads, k, PASS)
        row = scores_ptr + head.to(tl.int64) * seq_len
        hist = tl.zeros((512,), tl.int32)  # bytes in 0..255; keys that are not candidates in 256
        for start in range(part * split, part * split + split, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            inside = offs < seq_len
            key = _radix_key(tl.load(row + offs, mask=inside, other=0.0))
            candidate = inside & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
            hist += tl.histogram(tl.where(candidate, ((key >> shift) & 255).to(tl.int32), 256), 512)
        bins = tl.arange(0, 512)
        tl.atomic_add(hist_ptr + (PASS * n_heads + head) * 256 + bins, hist, mask=bins < 256)

    @triton.jit
    def radix_threshold_kernel(hist_ptr, out_ptr, n_heads, k):
        head = tl.program_id(0)
        tl.store(out_ptr + head + tl.arange(0, 1), _radix_threshold(hist_ptr, head, n_heads, k))


def radix_histograms(scores: torch.Tensor, k: int, split: int = 4096, block: int = 1024,
                     num_warps: int = 4, counted_first: torch.Tensor | None = None) -> torch.Tensor:
    """[passes, H, 256] int32: the four passes' histograms of a radix select of each row's
    k-th largest (one launch a pass, ``split`` scores a program). ``counted_first``: the
    histograms with the first pass already counted (``approx_scores(..., first_histogram=)``),
    completed here with the other three."""
    if split % block:
        raise ValueError(f"split ({split}) must be a multiple of block ({block})")
    n_heads, seq_len = scores.shape
    hist = counted_first
    if hist is None:
        hist = torch.zeros(RADIX_PASSES, n_heads, 256, device=scores.device, dtype=torch.int32)
    for step in range(0 if counted_first is None else 1, RADIX_PASSES):
        radix_histogram_kernel[(n_heads, triton.cdiv(seq_len, split))](
            scores, hist, seq_len, n_heads, k, split, PASS=step, BLOCK=block, num_warps=num_warps)
    return hist


def _check_k(scores: torch.Tensor, k: int) -> None:
    if scores.dim() != 2 or not 1 <= k <= scores.shape[1]:
        raise ValueError(f"expected scores [H, S] and 1 <= k <= S; got {tuple(scores.shape)}, k={k}")


def kth_largest(scores: torch.Tensor, k: int, split: int = 4096, block: int = 1024,
                num_warps: int = 4) -> torch.Tensor:
    """(c) each row's k-th largest score, on the kernels where they can run, else ``torch.topk``."""
    _check_k(scores, k)
    if not triton_available(scores.device):
        return kth_largest_reference(scores, k)
    scores = scores.float().contiguous()
    hist = radix_histograms(scores, k, split, block, num_warps)
    out = torch.empty(scores.shape[0], device=scores.device, dtype=torch.float32)
    radix_threshold_kernel[(scores.shape[0],)](hist, out, scores.shape[0], k)
    return out


# ----------------------------------------------------------------------------- (d) attention above a threshold

def threshold_attention_reference(q_pca: torch.Tensor, keys_pca: torch.Tensor, values: torch.Tensor,
                                  scores: torch.Tensor, threshold: torch.Tensor, scale: float) -> torch.Tensor:
    """[H, D]: exact softmax attention of each head over the keys whose approximate score
    is at least its threshold (fp32)."""
    group = _check(q_pca, keys_pca)
    keys = keys_pca.repeat_interleave(group, 0).float()
    exact = torch.einsum("hsd,hd->hs", keys, q_pca.float()) * scale
    exact = exact.masked_fill(scores < threshold[:, None], float("-inf"))
    return torch.einsum("hs,hsd->hd", exact.softmax(-1), values.repeat_interleave(group, 0).float())


if triton is not None:

    @triton.jit
    def compact_above_kernel(scores_ptr, threshold_ptr, hist_ptr, index_ptr, count_ptr, seq_len, n_heads, k,
                             n_chunks, FROM_HISTOGRAMS: tl.constexpr, CHUNK: tl.constexpr):
        # one program = one head x one chunk of CHUNK positions: the positions at or above
        # the threshold, in order, to the start of the chunk's own stretch of the index
        # buffer, and their number. The threshold is given, or derived from the histograms.
        head = tl.program_id(0)
        chunk = tl.program_id(1)
        if FROM_HISTOGRAMS:
            threshold = _radix_threshold(hist_ptr, head, n_heads, k)
        else:
            threshold = tl.load(threshold_ptr + head + tl.arange(0, 1))
        offs = chunk * CHUNK + tl.arange(0, CHUNK)
        inside = offs < seq_len
        approx = tl.load(scores_ptr + head.to(tl.int64) * seq_len + offs, mask=inside, other=float("-inf"))
        take = inside & (approx >= threshold)
        slot = tl.cumsum(take.to(tl.int32), axis=0) - 1
        tl.store(index_ptr + head.to(tl.int64) * seq_len + chunk * CHUNK + slot, offs, mask=take)
        taken = tl.zeros((1,), tl.int32) + tl.sum(take.to(tl.int32), axis=0)
        tl.store(count_ptr + head * n_chunks + chunk + tl.arange(0, 1), taken)

    @triton.jit
    def select_compact_kernel(scores_ptr, hist_ptr, index_ptr, count_ptr, seq_len, n_heads, k, n_chunks,
                              BLOCK: tl.constexpr, CHUNK: tl.constexpr):
        # one program = one row (head): the radix select's last three passes, each counted
        # whole by this program (no atomics, no launch between passes), then the row's
        # compaction chunk by chunk into the same layout as compact_above_kernel's.
        # The first pass's counts are in hist[0] (approx_scores counted them); each later
        # pass's counts are written to hist[p] too, for the tests and for inspection.
        head = tl.program_id(0)
        row = scores_ptr + head.to(tl.int64) * seq_len
        bins = tl.arange(0, 512)  # tl.histogram's bins: bytes 0..255, non-candidates in 256
        real = bins < 256
        counts = tl.load(hist_ptr + head * 256 + bins, mask=real, other=0)
        prefix = tl.zeros((1,), tl.int64)
        remaining = tl.zeros((1,), tl.int32) + k
        for step in tl.static_range(4):  # RADIX_PASSES
            shift = 24 - 8 * step
            if step > 0:
                counts = tl.zeros((512,), tl.int32)
                for start in range(0, seq_len, BLOCK):
                    offs = start + tl.arange(0, BLOCK)
                    inside = offs < seq_len
                    key = _radix_key(tl.load(row + offs, mask=inside, other=0.0))
                    agrees = inside & ((key >> (shift + 8)) == (prefix >> (shift + 8)))
                    counts += tl.histogram(tl.where(agrees, ((key >> shift) & 255).to(tl.int32), 256), 512)
                counts = tl.where(real, counts, 0)  # the non-candidates' bin dropped: they rank nowhere
                tl.store(hist_ptr + (step * n_heads + head) * 256 + bins, counts, mask=real)
            at_or_above = tl.sum(counts, axis=0) - tl.cumsum(counts, axis=0) + counts  # keys with byte >= b
            byte = tl.max(tl.where(real & (at_or_above >= remaining), bins, -1), axis=0)
            remaining -= tl.sum(tl.where(bins > byte, counts, 0), axis=0)
            prefix = prefix | (byte.to(tl.int64) << shift)
        threshold = _float_of_key(prefix)
        for chunk in range(0, n_chunks):
            offs = chunk * CHUNK + tl.arange(0, CHUNK)
            inside = offs < seq_len
            kept = inside & (tl.load(row + offs, mask=inside, other=float("-inf")) >= threshold)
            slot = tl.cumsum(kept.to(tl.int32), axis=0) - 1
            tl.store(index_ptr + head.to(tl.int64) * seq_len + chunk * CHUNK + slot, offs, mask=kept)
            tl.store(count_ptr + head * n_chunks + chunk + tl.arange(0, 1),
                     tl.zeros((1,), tl.int32) + tl.sum(kept.to(tl.int32), axis=0))

    @triton.jit
    def compacted_attention_kernel(q_ptr, keys_ptr, values_ptr, index_ptr, count_ptr, max_ptr, sum_ptr, acc_ptr,
                                   seq_len, group, select_group, scale, n_chunks,
                                   HEAD_DIM: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr):
        # one program = one head x one chunk: exact attention over the chunk's selected
        # rows, read densely from the compacted index; its partial softmax out. Query head
        # h reads selection h // select_group (1: its own; group: its kv head's)
        head = tl.program_id(0)
        chunk = tl.program_id(1)
        kv = head // group
        selection = head // select_group
        offs_d = tl.arange(0, HEAD_DIM)
        q = tl.load(q_ptr + head * HEAD_DIM + offs_d).to(tl.float32)
        count = tl.load(count_ptr + selection * n_chunks + chunk)
        selected = index_ptr + selection.to(tl.int64) * seq_len + chunk * CHUNK
        running_max = tl.full((1,), float("-inf"), tl.float32)
        running_sum = tl.zeros((1,), tl.float32)
        acc = tl.zeros((HEAD_DIM,), tl.float32)
        for start in range(0, count, BLOCK_K):
            offs_k = start + tl.arange(0, BLOCK_K)
            mask_k = offs_k < count
            rows = tl.load(selected + offs_k, mask=mask_k, other=0)
            running_max, running_sum, acc = _attend_rows(q, keys_ptr, values_ptr, rows, mask_k, kv, seq_len, scale,
                                                         running_max, running_sum, acc, HEAD_DIM)
        _store_partial(max_ptr, sum_ptr, acc_ptr, head * n_chunks + chunk, running_max, running_sum, acc, HEAD_DIM)

    @triton.jit
    def combine_partials_kernel(max_ptr, sum_ptr, acc_ptr, out_ptr, n_chunks,
                                HEAD_DIM: tl.constexpr, BLOCK_C: tl.constexpr):
        # the merge of combine_chunks in one launch: one program a head
        head = tl.program_id(0)
        offs_c = tl.arange(0, BLOCK_C)
        offs_d = tl.arange(0, HEAD_DIM)
        used = offs_c < n_chunks
        maxima = tl.load(max_ptr + head * n_chunks + offs_c, mask=used, other=float("-inf"))
        top = tl.max(maxima, axis=0)
        weight = tl.where(maxima == float("-inf"), 0.0, tl.exp(maxima - top))  # empty chunks weigh 0
        total = tl.sum(weight * tl.load(sum_ptr + head * n_chunks + offs_c, mask=used, other=0.0), axis=0)
        accs = tl.load(acc_ptr + (head * n_chunks + offs_c[:, None]) * HEAD_DIM + offs_d[None, :],
                       mask=used[:, None], other=0.0)
        tl.store(out_ptr + head * HEAD_DIM + offs_d, tl.sum(accs * weight[:, None], axis=0) / total)


def combine_partials(maxima: torch.Tensor, sums: torch.Tensor, accs: torch.Tensor) -> torch.Tensor:
    """``combine_chunks`` on one kernel launch where it can run."""
    if not triton_available(maxima.device) or not _pow2(accs.shape[-1]):
        return combine_chunks(maxima, sums, accs)
    n_heads, n_chunks, head_dim = accs.shape
    out = torch.empty(n_heads, head_dim, device=accs.device, dtype=torch.float32)
    combine_partials_kernel[(n_heads,)](maxima.contiguous(), sums.contiguous(), accs.contiguous(), out, n_chunks,
                                        HEAD_DIM=head_dim, BLOCK_C=max(2, triton.next_power_of_2(n_chunks)))
    return out


def _attend_above(q_pca, keys_pca, values, scores, threshold, hist, k, scale, block_k, chunk,
                  select_block: int | None = None, select_warps: int = 4):
    """Compact each chunk's selected positions, attend over them, merge the chunks.
    ``scores`` holds one row per selection: per query head [H, S], or per kv head [Hkv, S].
    The threshold is given, or read off ``hist`` (its four passes counted), or, with
    ``select_block``, selected and compacted by one program a row from ``hist[0]`` alone."""
    q_pca, keys_pca, values = (t.contiguous() for t in (q_pca, keys_pca, values))
    n_selections, seq_len = scores.shape
    n_heads, head_dim = q_pca.shape
    n_chunks = triton.cdiv(seq_len, chunk)
    index = torch.empty(n_selections, seq_len, device=scores.device, dtype=torch.int32)
    counts = torch.empty(n_selections, n_chunks, device=scores.device, dtype=torch.int32)
    if select_block is not None:
        select_compact_kernel[(n_selections,)](scores, hist, index, counts, seq_len, n_selections, k, n_chunks,
                                               BLOCK=select_block, CHUNK=chunk, num_warps=select_warps)
    else:
        from_histograms = threshold is None
        compact_above_kernel[(n_selections, n_chunks)](
            scores, scores if from_histograms else threshold, hist if from_histograms else scores, index, counts,
            seq_len, n_selections, k, n_chunks, FROM_HISTOGRAMS=from_histograms, CHUNK=chunk)
    maxima = torch.empty(n_heads, n_chunks, device=scores.device, dtype=torch.float32)
    sums = torch.empty_like(maxima)
    accs = torch.empty(n_heads, n_chunks, head_dim, device=scores.device, dtype=torch.float32)
    compacted_attention_kernel[(n_heads, n_chunks)](
        q_pca, keys_pca, values, index, counts, maxima, sums, accs, seq_len, n_heads // keys_pca.shape[0],
        n_heads // n_selections, scale, n_chunks, HEAD_DIM=head_dim, BLOCK_K=block_k, CHUNK=chunk)
    return combine_partials(maxima, sums, accs)


def threshold_attention(q_pca: torch.Tensor, keys_pca: torch.Tensor, values: torch.Tensor, scores: torch.Tensor,
                        threshold: torch.Tensor, scale: float, block_k: int = 64, chunk: int = 1024) -> torch.Tensor:
    """(d) on the triton kernels where they can run (D a power of two), else the reference."""
    _check(q_pca, keys_pca)
    if values.shape != keys_pca.shape or scores.shape != (q_pca.shape[0], keys_pca.shape[1]) \
            or threshold.shape != (q_pca.shape[0],):
        raise ValueError(f"values must match keys {tuple(keys_pca.shape)}, scores be [H, S] and threshold [H]; got "
                         f"{tuple(values.shape)}, {tuple(scores.shape)}, {tuple(threshold.shape)}")
    if not (triton_available(q_pca.device) and _pow2(q_pca.shape[1]) and _pow2(chunk)):
        return threshold_attention_reference(q_pca, keys_pca, values, scores, threshold, scale)
    return _attend_above(q_pca, keys_pca, values, scores.float().contiguous(), threshold.float().contiguous(),
                         None, 0, scale, block_k, chunk)


def loki_decode_select(q_pca: torch.Tensor, keys_pca: torch.Tensor, values: torch.Tensor, k: int, d: int,
                       scale: float, keys_lead: torch.Tensor | None = None, split: int = 4096,
                       select_block: int = 1024, select_warps: int = 4, block_k: int = 64,
                       chunk: int = 1024, per_kv_head: bool = False,
                       select_in_one: bool = False) -> torch.Tensor:
    """(a) → (c) → (d): one Loki decoding step with no sort: the approximate scores (which
    count the first of the four histogram passes), the other three passes, then compaction
    (which reads the threshold off the histograms), attention and the merge: seven launches.
    ``keys_lead``: the first d PCA dimensions of the keys stored apart (read by (a));
    ``per_kv_head``: one selection per key/value head, by the group's summed query (module
    docstring); ``select_in_one``: the last three passes and the compaction in one launch,
    one program a row (``select_compact_kernel``): four launches, not seven, but only as
    many programs as rows for that part (``split`` unused); the rest are launch sizes of (c) and (d)."""
    group = _check(q_pca, keys_pca)
    if per_kv_head:  # (Σ_h q_h)·k = Σ_h (q_h·k): one row of scores per kv head
        selecting = q_pca.float().view(keys_pca.shape[0], group, q_pca.shape[1]).sum(1)
    else:
        selecting = q_pca
    on_kernels = triton_available(q_pca.device) and _pow2(q_pca.shape[1]) and _pow2(chunk)
    hist = None
    if on_kernels:
        hist = torch.zeros(RADIX_PASSES, selecting.shape[0], 256, device=q_pca.device, dtype=torch.int32)
    scores = approx_scores(selecting, keys_pca if keys_lead is None else keys_lead, d, first_histogram=hist)
    _check_k(scores, k)
    if not on_kernels:
        threshold = kth_largest_reference(scores, k)
        if per_kv_head:
            scores, threshold = scores.repeat_interleave(group, 0), threshold.repeat_interleave(group, 0)
        return threshold_attention_reference(q_pca, keys_pca, values, scores, threshold, scale)
    if select_in_one:
        return _attend_above(q_pca, keys_pca, values, scores, None, hist, k, scale, block_k, chunk,
                             select_block=select_block, select_warps=select_warps)
    hist = radix_histograms(scores, k, split, select_block, select_warps, counted_first=hist)
    return _attend_above(q_pca, keys_pca, values, scores, None, hist, k, scale, block_k, chunk)


# ----------------------------------------------------------------------------- (e) the whole step in one launch

# At short contexts the step is launch-bound: (a) → (c) → (d) is seven launches (eight when the
# H200 record was made, its first radix pass a launch of its own), and on that record its fixed cost (0.07 ms in a CUDA graph) stayed above the 20 µs target. Up to
# this many keys, one program a head does the whole step: a head's scores fit its registers
# to be sorted. Beyond it one program a head would leave most of the GPU idle.
FUSED_MAX_CONTEXT = 4096

if triton is not None:

    @triton.jit
    def fused_step_kernel(q_ptr, lead_ptr, keys_ptr, values_ptr, scratch_ptr, out_ptr, seq_len, group, lead_stride,
                          k, scale, D_LEAD: tl.constexpr, HEAD_DIM: tl.constexpr, S_POW2: tl.constexpr,
                          BLOCK_K: tl.constexpr):
        # one program = one query head, the whole decoding step
        head = tl.program_id(0)
        kv = head // group
        offs_lead = tl.arange(0, D_LEAD)
        q_lead = tl.load(q_ptr + head * HEAD_DIM + offs_lead).to(tl.float32)
        row = scratch_ptr + head.to(tl.int64) * S_POW2
        # (a) the approximate scores, a block of keys at a time, into the head's scratch row
        for start in range(0, seq_len, BLOCK_K):
            offs = start + tl.arange(0, BLOCK_K)
            inside = offs < seq_len
            lead = tl.load(lead_ptr + (kv * seq_len + offs[:, None]).to(tl.int64) * lead_stride + offs_lead[None, :],
                           mask=inside[:, None], other=0.0).to(tl.float32)
            tl.store(row + offs, tl.sum(lead * q_lead[None, :], axis=1), mask=inside)
        tl.debug_barrier()  # every thread's scores written before any thread reads the row whole
        # (c) the k-th largest: the row sorted in registers
        offs_s = tl.arange(0, S_POW2)
        ordered = tl.sort(tl.load(row + offs_s, mask=offs_s < seq_len, other=float("-inf")), dim=0, descending=True)
        threshold = tl.max(tl.where(offs_s == k - 1, ordered, float("-inf")), axis=0)
        # (d) exact attention over the keys at or above it (ties all kept, as in (d)), online softmax
        q = tl.load(q_ptr + head * HEAD_DIM + tl.arange(0, HEAD_DIM)).to(tl.float32)
        running_max = tl.full((1,), float("-inf"), tl.float32)
        running_sum = tl.zeros((1,), tl.float32)
        acc = tl.zeros((HEAD_DIM,), tl.float32)
        for start in range(0, seq_len, BLOCK_K):
            rows = start + tl.arange(0, BLOCK_K)
            approx = tl.load(row + rows, mask=rows < seq_len, other=float("-inf"))
            used = (rows < seq_len) & (approx >= threshold)
            running_max, running_sum, acc = _attend_rows(q, keys_ptr, values_ptr, rows, used, kv, seq_len, scale,
                                                         running_max, running_sum, acc, HEAD_DIM)
        tl.store(out_ptr + head * HEAD_DIM + tl.arange(0, HEAD_DIM), acc / running_sum)


def loki_decode_fused(q_pca: torch.Tensor, keys_pca: torch.Tensor, values: torch.Tensor, k: int, d: int,
                      scale: float, keys_lead: torch.Tensor | None = None, block_k: int = 64,
                      num_warps: int = 4) -> torch.Tensor:
    """(a) → (c) → (d) in one launch, one program a head, for contexts up to
    :data:`FUSED_MAX_CONTEXT`: the same step as :func:`loki_decode_select` (the keys at or
    above each head's k-th largest approximate score, ties kept), for the short contexts at
    which that one is launch-bound. ``keys_lead``: the first d PCA dimensions stored apart."""
    group = _check(q_pca, keys_pca)
    seq_len = keys_pca.shape[1]
    if seq_len > FUSED_MAX_CONTEXT:
        raise ValueError(f"keys_pca holds {seq_len} keys; loki_decode_fused takes at most {FUSED_MAX_CONTEXT} "
                         "(one program a head): use loki_decode_select")
    if values.shape != keys_pca.shape:
        raise ValueError(f"values must match keys {tuple(keys_pca.shape)}; got {tuple(values.shape)}")
    lead = keys_pca if keys_lead is None else keys_lead
    if lead.shape[:2] != keys_pca.shape[:2] or lead.shape[2] < d:
        raise ValueError(f"keys_lead must be [Hkv, S, >= d] = [{keys_pca.shape[0]}, {seq_len}, >= {d}]; "
                         f"got {tuple(lead.shape)}")
    if not 1 <= k <= seq_len:
        raise ValueError(f"k={k}; it must lie in [1, {seq_len}] (the keys held)")
    if not (triton_available(q_pca.device) and _pow2(q_pca.shape[1]) and _pow2(d) and d <= q_pca.shape[1]):
        scores = approx_scores_reference(q_pca, keys_pca, d)
        return threshold_attention_reference(q_pca, keys_pca, values, scores, kth_largest_reference(scores, k), scale)
    q_pca, keys_pca, values, lead = (t.contiguous() for t in (q_pca, keys_pca, values, lead))
    n_heads, head_dim = q_pca.shape
    s_pow2 = max(2, triton.next_power_of_2(seq_len))
    scratch = torch.empty(n_heads, s_pow2, device=q_pca.device, dtype=torch.float32)
    out = torch.empty(n_heads, head_dim, device=q_pca.device, dtype=torch.float32)
    fused_step_kernel[(n_heads,)](q_pca, lead, keys_pca, values, scratch, out, seq_len, group, lead.shape[2], k, scale,
                                  D_LEAD=d, HEAD_DIM=head_dim, S_POW2=s_pow2, BLOCK_K=block_k, num_warps=num_warps)
    return out
