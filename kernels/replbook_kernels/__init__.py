"""Triton kernels of the replication book, each beside a plain-torch reference.

Pattern (every kernel follows it):

- ``<name>_reference``: the plain-torch definition — the ground truth;
- ``<name>_kernel``: the ``@triton.jit`` kernel;
- ``<name>``: the entry point; runs the kernel on a GPU, or on the CPU under
  ``TRITON_INTERPRET=1`` (slow, for tests), and otherwise falls back to the reference.

Tests compare the kernel with its reference under the interpreter on small
shapes, and compiled on a GPU when one is present.
"""
from .endor import (BitmapGroup, bitmap_decode, bitmap_decode_blocks, bitmap_decode_grouped,
                    bitmap_decode_grouped_reference, bitmap_decode_reference, bitmap_group)
from .gathered_scores import gathered_scores, gathered_scores_reference, triton_available
from .loki import (approx_scores, approx_scores_reference, combine_partials, kth_largest, kth_largest_reference,
                   loki_decode, loki_decode_fused, loki_decode_select, threshold_attention, threshold_attention_reference,
                   topk_attention, topk_attention_reference)

__all__ = ["gathered_scores", "gathered_scores_reference", "triton_available", "approx_scores",
           "approx_scores_reference", "topk_attention", "topk_attention_reference", "loki_decode", "kth_largest",
           "kth_largest_reference", "threshold_attention", "threshold_attention_reference", "combine_partials",
           "loki_decode_select", "loki_decode_fused", "bitmap_decode", "bitmap_decode_blocks", "bitmap_decode_reference", "BitmapGroup",
           "bitmap_group", "bitmap_decode_grouped", "bitmap_decode_grouped_reference"]
