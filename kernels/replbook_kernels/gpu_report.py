"""One prepared GPU check for every kernel: correctness against the torch reference
(compiled, not interpreted) and speed, with the fraction of the memory-bandwidth
roofline. Run on a machine with a CUDA GPU:

    PYTHONPATH=lib:kernels python -m replbook_kernels.gpu_report OUT_DIR

It writes ``gathered_scores_<device>.json`` and ``loki_<device>.json`` into OUT_DIR.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from .endor import bitmap_decode, bitmap_decode_reference
from .gathered_scores import benchmark, gathered_scores, gathered_scores_reference
from .loki import approx_scores, approx_scores_reference, loki_decode, topk_attention, topk_attention_reference

# peak HBM bandwidth in GB/s, from the vendors' data sheets
PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def peak_bandwidth(name: str) -> float | None:
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def cuda_ms(fn, repeats: int = 50) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def header() -> dict:
    import triton

    return {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}


def gathered_scores_report() -> dict:
    report = {**header(), "correctness": [], "speed": []}
    for heads, seq, dim, sel in [(1, 8, 16, 1), (3, 100, 32, 37), (32, 4096, 128, 1000)]:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(heads, dim, device="cuda", generator=g, dtype=torch.float16)
        keys = torch.randn(heads, seq, dim, device="cuda", generator=g, dtype=torch.float16)
        index = torch.randint(0, seq, (heads, sel), device="cuda", generator=g)
        err = (gathered_scores(q, keys, index) - gathered_scores_reference(q, keys, index)).abs().max().item()
        report["correctness"].append({"shape": [heads, seq, dim, sel], "max_abs_err": err, "ok": err < 1e-2})
    peak = peak_bandwidth(report["device"])
    for seq in (1024, 4096, 16384, 65536, 262144):
        for block_k in (32, 64, 128):
            row = benchmark(n_heads=32, seq_len=seq, head_dim=128, k_fraction=0.25, block_k=block_k)
            row["roofline_fraction"] = row["triton_GBps"] / peak if peak else None
            report["speed"].append(row)
    return report


def loki_report(k_f: float = 0.25, d_f: float = 0.25) -> dict:
    """Correctness of (a), (b) and the whole step; then one decoding step, Loki on the kernels
    vs dense ``scaled_dot_product_attention``, at Llama-2-7B's attention shape (32 heads, D=128)
    and a grouped-query shape (32 query heads, 8 kv heads), fp16, across context lengths."""
    report = {**header(), "k_f": k_f, "d_f": d_f, "correctness": [], "speed": []}
    g = torch.Generator(device="cuda").manual_seed(0)
    for heads, kv_heads, seq, dim, d, k in [(4, 2, 100, 64, 16, 30), (32, 8, 4096, 128, 32, 1024)]:
        q = torch.randn(heads, dim, device="cuda", generator=g, dtype=torch.float16)
        keys = torch.randn(kv_heads, seq, dim, device="cuda", generator=g, dtype=torch.float16)
        values = torch.randn(kv_heads, seq, dim, device="cuda", generator=g, dtype=torch.float16)
        index = torch.randint(0, seq, (heads, k), device="cuda", generator=g)
        scale = dim ** -0.5
        err_a = (approx_scores(q, keys, d) - approx_scores_reference(q, keys, d)).abs().max().item()
        err_b = (topk_attention(q, keys, values, index, scale)
                 - topk_attention_reference(q, keys, values, index, scale)).abs().max().item()
        dense = F.scaled_dot_product_attention(q[None, :, None], keys[None], values[None], enable_gqa=True,
                                               scale=scale)[0, :, 0].float()
        err_full = (loki_decode(q, keys, values, seq, dim, scale) - dense).abs().max().item()
        report["correctness"].append({"shape": [heads, kv_heads, seq, dim, d, k], "approx_scores_err": err_a,
                                      "topk_attention_err": err_b, "k_equals_S_vs_dense_err": err_full,
                                      "ok": max(err_a, err_b, err_full) < 2e-2})
    for heads, kv_heads in [(32, 32), (32, 8)]:
        for seq in (1024, 4096, 16384, 65536):
            dim = 128
            q = torch.randn(heads, dim, device="cuda", dtype=torch.float16)
            keys = torch.randn(kv_heads, seq, dim, device="cuda", dtype=torch.float16)
            values = torch.randn(kv_heads, seq, dim, device="cuda", dtype=torch.float16)
            k, d = max(1, round(k_f * seq)), max(1, round(d_f * dim))
            dense_ms = cuda_ms(lambda: F.scaled_dot_product_attention(
                q[None, :, None], keys[None], values[None], enable_gqa=True))
            loki_ms = cuda_ms(lambda: loki_decode(q, keys, values, k, d, dim ** -0.5))
            # where Loki's time goes: (a), torch.topk, (b)
            scores = approx_scores(q, keys, d)
            index = scores.topk(k, dim=-1, sorted=False).indices
            parts = {"approx_ms": cuda_ms(lambda: approx_scores(q, keys, d)),
                     "topk_ms": cuda_ms(lambda: scores.topk(k, dim=-1, sorted=False)),
                     "attention_ms": cuda_ms(lambda: topk_attention(q, keys, values, index, dim ** -0.5))}
            report["speed"].append({"heads": heads, "kv_heads": kv_heads, "context": seq, "head_dim": dim,
                                    "dense_ms": dense_ms, "loki_ms": loki_ms, "speedup": dense_ms / loki_ms,
                                    **parts})
            print(json.dumps(report["speed"][-1]))
    return report


def endor_report(sparsity: float = 0.5) -> dict:
    """Bitmap decompression on the GPU (chapter 04, C2): bit-exact against the torch
    reference, and decode throughput in GB/s of dense fp16 output, beside the transfers it
    competes with — a pinned host-to-device copy of the dense and of the compressed weight."""
    report = {**header(), "sparsity": sparsity, "rows": []}
    # SmolLM2, Llama-2-70B's k/v projection (GQA), Llama-2-7B's and Llama-2-70B's MLP, OPT-66B's fc2
    for rows, cols in [(576, 1536), (8192, 1024), (4096, 11008), (8192, 28672), (9216, 36864)]:
        g = torch.Generator(device="cuda").manual_seed(0)
        dense = torch.randn(rows, cols, device="cuda", generator=g, dtype=torch.float16)
        dense[torch.rand(rows, cols, device="cuda", generator=g) < sparsity] = 0
        mask = dense.view(torch.int16) != 0
        values = dense[mask]
        bits = mask.view(rows, -1, 8).to(torch.uint8)  # every shape here has cols % 8 == 0
        weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], device="cuda", dtype=torch.uint8)
        bitmap = (bits * weights).sum(-1, dtype=torch.uint8)
        offsets = torch.zeros(rows + 1, dtype=torch.int64, device="cuda")
        offsets[1:] = mask.sum(1).cumsum(0)
        decoded = bitmap_decode(bitmap, values, offsets, cols)
        exact = bool(torch.equal(decoded.view(torch.int16), dense.view(torch.int16)))
        reference_exact = bool(torch.equal(bitmap_decode_reference(bitmap, values, offsets, cols).view(torch.int16),
                                           dense.view(torch.int16)))
        decode_ms = cuda_ms(lambda: bitmap_decode(bitmap, values, offsets, cols), repeats=20)
        reference_ms = cuda_ms(lambda: bitmap_decode_reference(bitmap, values, offsets, cols), repeats=5)
        host_dense = dense.cpu().pin_memory()
        compressed_bytes = bitmap.numel() + values.numel() * 2 + offsets.numel() * 8
        host_packed = torch.empty(compressed_bytes, dtype=torch.uint8).pin_memory()
        h2d_dense_ms = cuda_ms(lambda: host_dense.to("cuda", non_blocking=True), repeats=10)
        h2d_packed_ms = cuda_ms(lambda: host_packed.to("cuda", non_blocking=True), repeats=10)
        dense_bytes = dense.numel() * 2
        report["rows"].append({
            "shape": [rows, cols], "bit_exact": exact and reference_exact, "decode_ms": decode_ms,
            "decode_GBps_dense_output": dense_bytes / decode_ms / 1e6, "reference_ms": reference_ms,
            "h2d_dense_ms": h2d_dense_ms, "h2d_compressed_ms": h2d_packed_ms,
            "h2d_GBps": dense_bytes / h2d_dense_ms / 1e6, "compression": dense_bytes / compressed_bytes,
        })
        print(json.dumps(report["rows"][-1]))
    return report


def main(out_dir: str) -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tag = "h200" if "H200" in torch.cuda.get_device_name() else "h100" if "H100" in torch.cuda.get_device_name() \
        else torch.cuda.get_device_name().split()[-1].lower()
    for name, make in [("endor", endor_report), ("loki", loki_report), ("gathered_scores", gathered_scores_report)]:
        report = make()
        (out / f"{name}_{tag}.json").write_text(json.dumps(report, indent=1))
        print(name, json.dumps(report.get("correctness", report.get("rows"))))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
