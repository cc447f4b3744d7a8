"""Chapter 04 — Endor: a bitmap format for unstructured-sparse weights
(Joo, Hadidi, Feizi, Asgari, 2024, arXiv 2406.11674).

A pruned weight matrix is stored as

- a **bitmap** of its non-zero positions, one bit per element, each row padded to
  whole bytes (``ceil(cols / 8)`` bytes a row) so rows decode independently;
- the **non-zero values**, packed in row-major order, in the weight's own dtype;
- **row offsets**: where each row's values start (``rows + 1`` int64).

Size ≈ 1 + b·(1 − s) bits per element for b-bit values at sparsity s (paper §3):
at s = 0.5 and fp16, 9 bits instead of 16, 1.78× smaller.

"Non-zero" is decided on the bit pattern, so a stored ``-0.0`` survives: the
round trip is bit-exact. The file adds a small header with a CRC-32 of the
payload; a truncated or corrupted file fails with a clear error.

CSR and COO, the formats the paper compares against, come from ``scipy.sparse``.
"""
from __future__ import annotations

import io
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MAGIC = b"ENDOR01\0"
DTYPES = {1: torch.float16, 2: torch.bfloat16, 3: torch.float32}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}
_HEADER = struct.Struct("<8sB3xQQQI")  # magic, dtype code, rows, cols, nnz, crc32 of the payload
_INT_VIEW = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32}


class EndorFormatError(ValueError):
    """A file that is not, or no longer, a valid Endor tensor."""


@dataclass
class BitmapTensor:
    """A 2-D tensor in Endor's bitmap format (see the module docstring)."""

    shape: tuple[int, int]
    dtype: torch.dtype
    bitmap: torch.Tensor  # uint8 [rows, ceil(cols / 8)], most significant bit first
    values: torch.Tensor  # [nnz], the weight's dtype
    row_offsets: torch.Tensor  # int64 [rows + 1]

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def nbytes(self) -> int:
        """Bytes of the three arrays (the header adds ``_HEADER.size``)."""
        return self.bitmap.numel() + self.values.numel() * self.values.element_size() + 8 * self.row_offsets.numel()


def nonzero_mask(dense: torch.Tensor) -> torch.Tensor:
    """Positions whose bit pattern is not all zeros (so -0.0 counts as stored)."""
    if dense.dtype not in _INT_VIEW:
        raise TypeError(f"dtype {dense.dtype} is not supported; use one of {list(DTYPE_CODES)}")
    return dense.contiguous().view(_INT_VIEW[dense.dtype]) != 0


def encode(dense: torch.Tensor) -> BitmapTensor:
    """Dense 2-D tensor → bitmap format."""
    if dense.dim() != 2:
        raise ValueError(f"Endor stores 2-D weights; got shape {tuple(dense.shape)}")
    dense = dense.detach().cpu().contiguous()
    mask = nonzero_mask(dense)
    bitmap = torch.from_numpy(np.packbits(mask.numpy(), axis=1))  # rows padded to whole bytes
    row_offsets = torch.zeros(dense.shape[0] + 1, dtype=torch.int64)
    row_offsets[1:] = mask.sum(1).cumsum(0)
    return BitmapTensor(tuple(dense.shape), dense.dtype, bitmap, dense[mask], row_offsets)


def decode(packed: BitmapTensor) -> torch.Tensor:
    """Bitmap format → dense tensor (the plain torch reference of the decompression kernel)."""
    rows, cols = packed.shape
    mask = torch.from_numpy(np.unpackbits(packed.bitmap.numpy(), axis=1, count=cols).astype(bool))
    out = torch.zeros(rows, cols, dtype=packed.dtype)
    out[mask] = packed.values
    return out


# ----------------------------------------------------------------------------- files

def to_bytes(packed: BitmapTensor) -> bytes:
    payload = io.BytesIO()
    payload.write(packed.row_offsets.numpy().tobytes())
    payload.write(packed.bitmap.numpy().tobytes())
    payload.write(packed.values.view(_INT_VIEW[packed.dtype]).numpy().tobytes())
    body = payload.getvalue()
    header = _HEADER.pack(MAGIC, DTYPE_CODES[packed.dtype], packed.shape[0], packed.shape[1], packed.nnz,
                          zlib.crc32(body))
    return header + body


def from_bytes(blob: bytes, name: str = "<bytes>") -> BitmapTensor:
    if len(blob) < _HEADER.size:
        raise EndorFormatError(f"{name}: truncated: {len(blob)} bytes, shorter than the {_HEADER.size}-byte header")
    magic, code, rows, cols, nnz, crc = _HEADER.unpack_from(blob)
    if magic != MAGIC:
        raise EndorFormatError(f"{name}: not an Endor file (magic {magic!r}, expected {MAGIC!r})")
    if code not in DTYPES:
        raise EndorFormatError(f"{name}: unknown dtype code {code}; known: {sorted(DTYPES)}")
    dtype = DTYPES[code]
    row_bytes, bitmap_bytes = 8 * (rows + 1), rows * ((cols + 7) // 8)
    value_bytes = nnz * torch.tensor([], dtype=dtype).element_size()
    expected = _HEADER.size + row_bytes + bitmap_bytes + value_bytes
    if len(blob) != expected:
        raise EndorFormatError(f"{name}: truncated or padded: {len(blob)} bytes, expected {expected} "
                               f"for a {rows}×{cols} {dtype} tensor with {nnz} non-zeros")
    body = memoryview(blob)[_HEADER.size:]
    if zlib.crc32(body) != crc:
        raise EndorFormatError(f"{name}: corrupt: the payload's CRC-32 does not match the header")
    def array(start: int, stop: int, np_dtype) -> torch.Tensor:  # numpy accepts empty buffers
        return torch.from_numpy(np.frombuffer(body[start:stop], dtype=np_dtype).copy())

    offsets = array(0, row_bytes, np.int64)
    bitmap = array(row_bytes, row_bytes + bitmap_bytes, np.uint8).reshape(rows, (cols + 7) // 8)
    int_values = array(row_bytes + bitmap_bytes, len(body), np.int16 if dtype != torch.float32 else np.int32)
    return BitmapTensor((rows, cols), dtype, bitmap, int_values.view(dtype), offsets)


def save(path: Path, packed: BitmapTensor) -> int:
    """Write one tensor; returns the bytes on disk."""
    blob = to_bytes(packed)
    Path(path).write_bytes(blob)
    return len(blob)


def load(path: Path) -> BitmapTensor:
    return from_bytes(Path(path).read_bytes(), str(path))


# ----------------------------------------------------------------------------- the formats compared

def theoretical_bits_per_element(sparsity: float, value_bits: int) -> float:
    """1 bit of bitmap + b bits for each of the (1 − s) kept values (paper §3)."""
    return 1.0 + value_bits * (1.0 - sparsity)


def array_bytes(dense: torch.Tensor) -> dict[str, int]:
    """Bytes of one 2-D weight's arrays in each format (no file headers): dense, Endor
    bitmap, CSR with int16 / int32 column indices (int32 row pointers), COO (int32 pairs)."""
    nnz, rows = int(nonzero_mask(dense.detach().cpu()).sum()), dense.shape[0]
    value_bytes = nnz * dense.element_size()
    return {
        "dense": dense.numel() * dense.element_size(),
        "bitmap": encode(dense).nbytes,
        "csr_int16": 4 * (rows + 1) + 2 * nnz + value_bytes,
        "csr_int32": 4 * (rows + 1) + 4 * nnz + value_bytes,
        "coo": 8 * nnz + value_bytes,
    }


# ----------------------------------------------------------------------------- pruning

PRUNERS = ("magnitude", "wanda")


def prune_scores(weight: torch.Tensor, method: str, input_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each weight: |W| (magnitude) or |W|·‖x_j‖ (Wanda, Sun et al. 2023:
    the weight's magnitude times the L2 norm of its input feature over calibration tokens)."""
    if method not in PRUNERS:
        raise ValueError(f"method={method!r}; choose one of: {', '.join(PRUNERS)}")
    scores = weight.detach().abs().float()
    if method == "wanda":
        if input_norms is None or input_norms.shape != (weight.shape[1],):
            raise ValueError(f"wanda needs input_norms of shape ({weight.shape[1]},)")
        scores = scores * input_norms.float()[None, :]
    return scores


def prune(weight: torch.Tensor, sparsity: float, method: str = "magnitude",
          input_norms: torch.Tensor | None = None) -> torch.Tensor:
    """Zero the ``sparsity`` fraction of least important weights in every output row
    (Wanda's per-output comparison group; the same groups for magnitude)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1); got {sparsity}")
    scores = prune_scores(weight, method, input_norms)
    n_drop = int(round(sparsity * weight.shape[1]))
    if n_drop == 0:
        return weight.clone()
    drop = scores.topk(n_drop, dim=1, largest=False).indices
    return weight.clone().scatter_(1, drop, 0.0)


def prunable_linears(model) -> dict[str, torch.nn.Linear]:
    """The linear layers inside the decoder blocks (attention and MLP projections): what
    Endor compresses. Embeddings, the output head and norms stay dense."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}" and "lm_head" not in name}


@torch.no_grad()
def input_norms(model, windows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """‖x_j‖₂ of every input feature of every prunable linear over the calibration tokens (Wanda)."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, linear in prunable_linears(model).items():
        def record(module, inputs, output, name=name):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0).cpu()
        hooks.append(linear.register_forward_hook(record))
    try:
        for ids in windows:
            model(ids[None].to(model.device))
    finally:
        for h in hooks:
            h.remove()
    return {name: s.sqrt() for name, s in sums.items()}


@torch.no_grad()
def prune_model(model, sparsity: float, method: str = "magnitude",
                norms: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Prune every prunable linear in place; returns the pruned weights by module name."""
    pruned = {}
    for name, linear in prunable_linears(model).items():
        weight = prune(linear.weight, sparsity, method, None if norms is None else norms[name])
        linear.weight.copy_(weight)
        pruned[name] = linear.weight
    return pruned


# ----------------------------------------------------------------------------- bytes on disk

def sparse_arrays(dense: torch.Tensor) -> dict[str, np.ndarray]:
    """The CSR/COO arrays of a weight (row-major non-zeros). Built from the bitmap's own
    non-zero test rather than with scipy.sparse, which does not store float16."""
    mask = nonzero_mask(dense.detach().cpu())
    rows, cols = mask.nonzero(as_tuple=True)
    indptr = torch.zeros(dense.shape[0] + 1, dtype=torch.int64)
    indptr[1:] = mask.sum(1).cumsum(0)
    return {"data": dense.detach().cpu()[mask].numpy(), "indptr": indptr.numpy(), "rows": rows.numpy(),
            "cols": cols.numpy()}


def write_formats(dense: torch.Tensor, folder: Path, stem: str) -> dict[str, int]:
    """Write one 2-D weight in every format and return the bytes each file takes on disk:
    dense (.npy), Endor bitmap (.endor), CSR with int16 and int32 column indices and int32
    row pointers, and COO with int32 row and column indices (uncompressed .npz files)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if dense.shape[1] > np.iinfo(np.int16).max + 1:
        raise ValueError(f"{stem}: {dense.shape[1]} columns do not fit 16-bit CSR indices")
    arrays = sparse_arrays(dense)
    shape = np.array(dense.shape)
    paths = {"dense": folder / f"{stem}.npy", "bitmap": folder / f"{stem}.endor",
             "csr_int16": folder / f"{stem}.csr16.npz", "csr_int32": folder / f"{stem}.csr32.npz",
             "coo": folder / f"{stem}.coo.npz"}
    np.save(paths["dense"], dense.detach().cpu().numpy())
    save(paths["bitmap"], encode(dense))
    for fmt, index_dtype in (("csr_int16", np.int16), ("csr_int32", np.int32)):
        np.savez(paths[fmt], indptr=arrays["indptr"].astype(np.int32), indices=arrays["cols"].astype(index_dtype),
                 data=arrays["data"], shape=shape)
    np.savez(paths["coo"], row=arrays["rows"].astype(np.int32), col=arrays["cols"].astype(np.int32),
             data=arrays["data"], shape=shape)
    return {fmt: path.stat().st_size for fmt, path in paths.items()}


def evict_from_page_cache(path: Path) -> None:
    """Ask the kernel to drop a file's cached pages (no root needed), so the next read
    comes from the disk, as an offloaded layer's would."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed_read(path: Path, cold: bool = True) -> tuple[bytes, float]:
    """Read a whole file, after evicting it from the page cache if ``cold``."""
    if cold:
        evict_from_page_cache(path)
    start = time.perf_counter()
    blob = Path(path).read_bytes()
    return blob, time.perf_counter() - start
