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

``bitmap_decode_grouped`` decodes several matrices in one launch: a transformer block's
weights, whose small matrices are launch-bound one at a time (issue #28). The matrices lie
back to back in one buffer each (:func:`bitmap_group`: bitmaps, values, and each row's
first value), as a block streamed in one transfer would; one program decodes one row of
any of them, finding its matrix from the matrices' first rows.
"""
from __future__ import annotations

from dataclasses import dataclass

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

    @triton.jit
    def bitmap_decode_grouped_kernel(bitmap_ptr, values_ptr, row_starts_ptr, first_rows_ptr, bitmap_bases_ptr,
                                     out_bases_ptr, cols_ptr, out_ptr, n_matrices, BLOCK: tl.constexpr,
                                     MATRICES: tl.constexpr):
        row = tl.program_id(0)  # a row of the whole group
        # its matrix: how many matrices end at or before it (an empty matrix ends where it starts)
        ids = tl.arange(0, MATRICES)
        ends = tl.load(first_rows_ptr + 1 + ids, mask=ids < n_matrices, other=0)
        matrix = tl.sum(((ends <= row) & (ids < n_matrices)).to(tl.int32), axis=0)
        local = row - tl.load(first_rows_ptr + matrix)  # int64: offsets past 2^31 elements stay exact
        cols = tl.load(cols_ptr + matrix).to(tl.int32)  # a loop bound of the width the row kernel's has
        bitmap_row = bitmap_ptr + tl.load(bitmap_bases_ptr + matrix) + local * ((cols + 7) // 8)
        out_row = tl.load(out_bases_ptr + matrix) + local * cols
        start = tl.load(row_starts_ptr + row)
        seen = start * 0
        for block in range(0, cols, BLOCK):
            pos = block + tl.arange(0, BLOCK)
            inside = pos < cols
            byte = tl.load(bitmap_row + pos // 8, mask=inside, other=0).to(tl.int32)
            bit = (byte >> (7 - pos % 8)) & 1
            take = (bit == 1) & inside
            value = tl.load(values_ptr + start + seen + tl.cumsum(bit, axis=0) - 1, mask=take, other=0.0)
            tl.store(out_ptr + out_row + pos, value, mask=inside)
            seen += tl.sum(bit, axis=0)


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


# ----------------------------------------------------------------------------- several matrices, one launch

@dataclass
class BitmapGroup:
    """Several matrices in the bitmap format, back to back: what one transfer of a block carries.

    ``bitmap``: every matrix's bitmap (uint8, each row padded to whole bytes), one after the
    other; ``values``: every matrix's packed values; ``row_starts`` [total rows]: each row's
    first value in ``values`` (a matrix's own row offsets moved by where its values begin);
    ``first_rows`` [matrices + 1]: each matrix's first row in the group, then the total;
    ``bitmap_bases``, ``out_bases`` [matrices]: each matrix's first bitmap byte and first
    output element; ``shapes``: each matrix's [rows, cols]."""

    bitmap: torch.Tensor
    values: torch.Tensor
    row_starts: torch.Tensor
    first_rows: torch.Tensor
    bitmap_bases: torch.Tensor
    out_bases: torch.Tensor
    cols: torch.Tensor
    shapes: list[tuple[int, int]]

    def to(self, device: torch.device | str) -> "BitmapGroup":
        moved = {name: getattr(self, name).to(device) for name in
                 ("bitmap", "values", "row_starts", "first_rows", "bitmap_bases", "out_bases", "cols")}
        return BitmapGroup(**moved, shapes=list(self.shapes))


def bitmap_group(matrices: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]]) -> BitmapGroup:
    """Lay ``matrices`` — each ``(bitmap, values, row_offsets, cols)`` as :func:`bitmap_decode`
    takes it, all with values of one dtype — back to back for :func:`bitmap_decode_grouped`."""
    if not matrices:
        raise ValueError("matrices=[]: give at least one (bitmap, values, row_offsets, cols)")
    dtypes = {values.dtype for _, values, _, _ in matrices}
    if len(dtypes) != 1:
        raise ValueError(f"matrices have values of {len(dtypes)} dtypes ({sorted(map(str, dtypes))}); "
                         "a group holds one")
    shapes, row_starts, bitmap_bases, out_bases, first_rows = [], [], [], [], [0]
    values_at = bitmap_at = out_at = 0
    for bitmap, values, row_offsets, cols in matrices:
        rows = _checked(bitmap, row_offsets, cols)
        shapes.append((rows, cols))
        row_starts.append(row_offsets[:-1].to(torch.int64).cpu() + values_at)
        bitmap_bases.append(bitmap_at)
        out_bases.append(out_at)
        first_rows.append(first_rows[-1] + rows)
        values_at += values.numel()
        bitmap_at += bitmap.numel()
        out_at += rows * cols
    device = matrices[0][0].device

    def table(numbers):
        return torch.tensor(numbers, dtype=torch.int64, device=device)

    return BitmapGroup(bitmap=torch.cat([b.reshape(-1) for b, _, _, _ in matrices]),
                       values=torch.cat([v.reshape(-1) for _, v, _, _ in matrices]),
                       row_starts=torch.cat(row_starts).to(device), first_rows=table(first_rows),
                       bitmap_bases=table(bitmap_bases), out_bases=table(out_bases),
                       cols=table([cols for _, cols in shapes]), shapes=shapes)


def bitmap_decode_grouped_reference(group: BitmapGroup) -> list[torch.Tensor]:
    """Each matrix of ``group`` decoded alone by :func:`bitmap_decode_reference`, from its
    own stretch of the group's buffers."""
    out = []
    for m, (rows, cols) in enumerate(group.shapes):
        first, base = int(group.first_rows[m]), int(group.bitmap_bases[m])
        bitmap = group.bitmap[base:base + rows * ((cols + 7) // 8)].view(rows, (cols + 7) // 8)
        starts = group.row_starts[first:first + rows]
        offsets = torch.cat([starts, starts.new_zeros(1)])  # the reference reads each row's start only
        out.append(bitmap_decode_reference(bitmap, group.values, offsets, cols))
    return out


def bitmap_decode_grouped(group: BitmapGroup, block: int = 1024, num_warps: int = 4) -> list[torch.Tensor]:
    """Every matrix of ``group``, dense, from one kernel launch where it can run (else the
    reference): views into one output buffer, in the group's order."""
    total_rows = int(group.first_rows[-1])
    if not triton_available(group.bitmap.device) or total_rows == 0:
        return bitmap_decode_grouped_reference(group)
    raw, out = _bit_patterns(group.values, 1, sum(rows * cols for rows, cols in group.shapes))
    bitmap_decode_grouped_kernel[(total_rows,)](
        group.bitmap.contiguous(), raw, group.row_starts.contiguous(), group.first_rows, group.bitmap_bases,
        group.out_bases, group.cols, out, len(group.shapes), BLOCK=block,
        MATRICES=max(2, triton.next_power_of_2(len(group.shapes))), num_warps=num_warps)
    flat = out.view(group.values.dtype).reshape(-1)
    return [flat[base:base + rows * cols].view(rows, cols)
            for base, (rows, cols) in zip(group.out_bases.tolist(), group.shapes)]
