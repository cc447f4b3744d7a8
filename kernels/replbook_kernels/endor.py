"""Endor's decompression (chapter 04): bitmap + packed values → dense, beside its
torch reference (``replbook.endor.decode``).

One program decodes one row: it walks the row in blocks of BLOCK columns, unpacks
the bitmap bits (most significant bit first, as ``numpy.packbits`` writes them),
and finds each non-zero's value by a prefix sum of the bits, starting from the
row's offset into the packed values.

``bitmap_decode_blocks`` spreads a row over many programs instead (one per block of
columns): a first launch counts each block's set bits, a cumulative sum turns the
counts into each block's start in the packed values, and the decode launch then needs
no walk along the row. More programs, more memory requests in flight: for the wide
matrices of the paper's models, where one program a row leaves the GPU waiting.
"""
from __future__ import annotations

import torch

from .gathered_scores import triton, triton_available

if triton is not None:
    import triton.language as tl

    @triton.jit
    def bitmap_decode_kernel(bitmap_ptr, values_ptr, offsets_ptr, out_ptr, cols, bytes_per_row,
                             BLOCK: tl.constexpr):
        row = tl.program_id(0)
        start = tl.load(offsets_ptr + row)
        seen = start * 0  # values consumed so far in this row (same integer type as the offsets)
        for block in range(0, cols, BLOCK):
            pos = block + tl.arange(0, BLOCK)
            inside = pos < cols
            byte = tl.load(bitmap_ptr + row * bytes_per_row + pos // 8, mask=inside, other=0).to(tl.int32)
            bit = (byte >> (7 - pos % 8)) & 1
            rank = tl.cumsum(bit, axis=0)  # inclusive: the k-th set bit has rank k
            take = (bit == 1) & inside
            value = tl.load(values_ptr + start + seen + rank - 1, mask=take, other=0.0)
            tl.store(out_ptr + row * cols + pos, value, mask=inside)
            seen += tl.sum(bit, axis=0)


    @triton.jit
    def bitmap_block_counts_kernel(bitmap_ptr, counts_ptr, cols, bytes_per_row, n_blocks, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        block = tl.program_id(1)
        pos = block * BLOCK + tl.arange(0, BLOCK)
        inside = pos < cols
        byte = tl.load(bitmap_ptr + row.to(tl.int64) * bytes_per_row + pos // 8, mask=inside, other=0).to(tl.int32)
        tl.store(counts_ptr + row * n_blocks + block, tl.sum((byte >> (7 - pos % 8)) & 1, axis=0))

    @triton.jit
    def bitmap_decode_blocks_kernel(bitmap_ptr, values_ptr, starts_ptr, out_ptr, cols, bytes_per_row, n_blocks,
                                    BLOCK: tl.constexpr):
        row = tl.program_id(0)
        block = tl.program_id(1)
        start = tl.load(starts_ptr + row * n_blocks + block)  # this block's first value
        pos = block * BLOCK + tl.arange(0, BLOCK)
        inside = pos < cols
        byte = tl.load(bitmap_ptr + row.to(tl.int64) * bytes_per_row + pos // 8, mask=inside, other=0).to(tl.int32)
        bit = (byte >> (7 - pos % 8)) & 1
        take = (bit == 1) & inside
        value = tl.load(values_ptr + start + tl.cumsum(bit, axis=0) - 1, mask=take, other=0.0)
        tl.store(out_ptr + row.to(tl.int64) * cols + pos, value, mask=inside)


def _checked(bitmap: torch.Tensor, row_offsets: torch.Tensor, cols: int) -> int:
    rows = bitmap.shape[0]
    if bitmap.dtype != torch.uint8 or bitmap.dim() != 2 or bitmap.shape[1] != (cols + 7) // 8:
        raise ValueError(f"bitmap must be uint8 [rows, ceil(cols/8)] = [{rows}, {(cols + 7) // 8}]; "
                         f"got {bitmap.dtype} {tuple(bitmap.shape)}")
    if row_offsets.shape != (rows + 1,):
        raise ValueError(f"row_offsets must have rows + 1 = {rows + 1} entries; got {tuple(row_offsets.shape)}")
    return rows


def _bit_patterns(values: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The values as integers and an integer output: int16 views keep fp16/bf16 bit
    patterns exact through the kernels (fp32 as int32)."""
    int_view = {2: torch.int16, 4: torch.int32}[values.element_size()]
    raw = values.view(int_view) if values.numel() else torch.zeros(1, dtype=int_view, device=values.device)
    return raw, torch.empty(rows, cols, dtype=int_view, device=values.device)


def bitmap_decode_blocks(bitmap: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, cols: int,
                         block: int = 1024, num_warps: int = 4) -> torch.Tensor:
    """:func:`bitmap_decode` with a row spread over one program per block of ``block`` columns."""
    rows = _checked(bitmap, row_offsets, cols)
    if not triton_available(bitmap.device) or rows == 0 or cols == 0:
        return bitmap_decode_reference(bitmap, values, row_offsets, cols)
    bitmap = bitmap.contiguous()
    n_blocks = triton.cdiv(cols, block)
    counts = torch.empty(rows, n_blocks, dtype=torch.int64, device=bitmap.device)
    bitmap_block_counts_kernel[(rows, n_blocks)](bitmap, counts, cols, bitmap.shape[1], n_blocks, BLOCK=block,
                                                 num_warps=num_warps)
    starts = counts.cumsum(1).sub_(counts).add_(row_offsets[:-1, None])  # exclusive sum from each row's offset
    raw, out = _bit_patterns(values, rows, cols)
    bitmap_decode_blocks_kernel[(rows, n_blocks)](bitmap, raw, starts, out, cols, bitmap.shape[1], n_blocks,
                                                  BLOCK=block, num_warps=num_warps)
    return out.view(values.dtype)


def bitmap_decode(bitmap: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, cols: int,
                  block: int = 1024, num_warps: int = 4) -> torch.Tensor:
    """Dense [rows, cols] from the bitmap format, on the kernel where it can run, else in torch."""
    rows = _checked(bitmap, row_offsets, cols)
    if not triton_available(bitmap.device) or rows == 0 or cols == 0:
        return bitmap_decode_reference(bitmap, values, row_offsets, cols)
    raw, out = _bit_patterns(values, rows, cols)
    bitmap_decode_kernel[(rows,)](bitmap.contiguous(), raw, row_offsets.contiguous(), out, cols,
                                  bitmap.shape[1], BLOCK=block, num_warps=num_warps)
    return out.view(values.dtype)


def bitmap_decode_reference(bitmap: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor,
                            cols: int) -> torch.Tensor:
    """Plain torch, any device: unpack the bits; the k-th set bit of row r takes value
    ``row_offsets[r] + k``, as the kernel reads it (so a row decodes from its own offset,
    and a decoder that ignored the offsets would fail the tests). Also the CPU decoder of
    ``replbook.endor``."""
    rows = bitmap.shape[0]
    shifts = torch.arange(7, -1, -1, device=bitmap.device, dtype=torch.uint8)
    bits = ((bitmap[..., None] >> shifts) & 1).reshape(rows, 8 * bitmap.shape[1])[:, :cols].bool()
    index = row_offsets[:-1, None].to(bitmap.device) + bits.cumsum(1) - 1  # the value of each set bit
    out = torch.zeros(rows, cols, dtype=values.dtype, device=bitmap.device)
    out[bits] = values[index[bits]]
    return out
