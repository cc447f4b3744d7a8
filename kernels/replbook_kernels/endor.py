"""Endor's decompression (chapter 04): bitmap + packed values → dense, beside its
torch reference (``replbook.endor.decode``).

One program decodes one row: it walks the row in blocks of BLOCK columns, unpacks
the bitmap bits (most significant bit first, as ``numpy.packbits`` writes them),
and finds each non-zero's value by a prefix sum of the bits, starting from the
row's offset into the packed values.
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


def bitmap_decode(bitmap: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor, cols: int,
                  block: int = 1024) -> torch.Tensor:
    """Dense [rows, cols] from the bitmap format, on the kernel where it can run, else in torch."""
    rows = bitmap.shape[0]
    if bitmap.dtype != torch.uint8 or bitmap.dim() != 2 or bitmap.shape[1] != (cols + 7) // 8:
        raise ValueError(f"bitmap must be uint8 [rows, ceil(cols/8)] = [{rows}, {(cols + 7) // 8}]; "
                         f"got {bitmap.dtype} {tuple(bitmap.shape)}")
    if row_offsets.shape != (rows + 1,):
        raise ValueError(f"row_offsets must have rows + 1 = {rows + 1} entries; got {tuple(row_offsets.shape)}")
    if not triton_available(bitmap.device) or rows == 0 or cols == 0:
        return bitmap_decode_reference(bitmap, values, row_offsets, cols)
    # int16 views keep fp16/bf16 bit patterns exact through the kernel (fp32 as int32)
    int_view = {2: torch.int16, 4: torch.int32}[values.element_size()]
    out = torch.empty(rows, cols, dtype=int_view, device=bitmap.device)
    raw = values.view(int_view) if values.numel() else torch.zeros(1, dtype=int_view, device=bitmap.device)
    bitmap_decode_kernel[(rows,)](bitmap.contiguous(), raw, row_offsets.contiguous(), out, cols,
                                  bitmap.shape[1], BLOCK=block)
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
