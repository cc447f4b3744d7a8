"""The GPU measurements kept in ``kernels/measurements/``, and which one decides each check.

A GPU is lent to some sessions only, so the chapters cannot measure on one: they read records
that ``bash kernels/run_on_gpu.sh`` wrote on a lent GPU. Which record decides a chapter's
check is written down here rather than taken from the folder's order. A sorted glob picks by
file name: chapter 04 read the first ``endor_*.json``, so an ``endor_h100.json`` kept later
would have silently replaced the H200 record its C2 is decided by (``h100`` sorts first),
and chapter 08 took "the first record with targets". ``tests/test_gpu_records.py`` holds
every entry to a kept record of its kind, with the fields its chapter reads.
"""
from __future__ import annotations

import json
from pathlib import Path

from .paths import repo_root

# kind -> the record that decides it (a file in kernels/measurements/)
DECIDING = {
    "endor_decode": "endor_h200.json",  # chapter 04, C2: the decoders against the HBM roofline
    "endor_offload": "endor_offload_h200.json",  # chapter 04, C3: offloaded inference, Endor vs Accelerate
    "loki_step": "loki_h200.json",  # chapter 08, C3: the decoding step against dense attention, with targets
}
# what each kind's record must hold for its chapter to read it
REQUIRED_FIELDS = {
    "endor_decode": ("device", "torch", "triton", "sparsity", "rows"),
    "endor_offload": ("device", "torch", "triton", "reader", "models"),
    "loki_step": ("device", "torch", "triton", "k_f", "d_f", "correctness", "speed", "targets"),
}


def measurements_dir(root: Path | None = None) -> Path:
    return (root or repo_root()) / "kernels" / "measurements"


def deciding_path(kind: str, root: Path | None = None) -> Path:
    if kind not in DECIDING:
        raise KeyError(f"gpu_records: kind={kind!r} is not one of {sorted(DECIDING)}")
    return measurements_dir(root) / DECIDING[kind]


def deciding(kind: str, root: Path | None = None) -> dict | None:
    """The record that decides ``kind`` (see :data:`DECIDING`), or None where it is not kept
    (a chapter then says its GPU check is not testable)."""
    path = deciding_path(kind, root)
    return json.loads(path.read_text()) if path.exists() else None
