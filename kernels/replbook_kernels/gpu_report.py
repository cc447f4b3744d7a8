"""One prepared GPU check for every kernel: correctness against the torch reference
(compiled, not interpreted) and speed, with the fraction of the memory-bandwidth
roofline. Run on a machine with a CUDA GPU:

    PYTHONPATH=lib:kernels python -m replbook_kernels.gpu_report out.json
"""
from __future__ import annotations

import json
import sys

import torch

from .gathered_scores import benchmark, gathered_scores, gathered_scores_reference

# peak HBM bandwidth in GB/s, from the vendors' data sheets
PEAK_GBPS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def peak_bandwidth(name: str) -> float | None:
    return next((v for k, v in PEAK_GBPS.items() if k in name), None)


def main(out: str) -> None:
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    name = torch.cuda.get_device_name()
    report = {"device": name, "torch": torch.__version__, "correctness": [], "speed": []}
    import triton

    report["triton"] = triton.__version__
    for heads, seq, dim, sel in [(1, 8, 16, 1), (3, 100, 32, 37), (32, 4096, 128, 1000)]:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(heads, dim, device="cuda", generator=g, dtype=torch.float16)
        keys = torch.randn(heads, seq, dim, device="cuda", generator=g, dtype=torch.float16)
        index = torch.randint(0, seq, (heads, sel), device="cuda", generator=g)
        err = (gathered_scores(q, keys, index) - gathered_scores_reference(q, keys, index)).abs().max().item()
        report["correctness"].append({"shape": [heads, seq, dim, sel], "max_abs_err": err, "ok": err < 1e-2})
    peak = peak_bandwidth(name)
    for seq in (1024, 4096, 16384, 65536, 262144):
        for block_k in (32, 64, 128):
            row = benchmark(n_heads=32, seq_len=seq, head_dim=128, k_fraction=0.25, block_k=block_k)
            row["roofline_fraction"] = row["triton_GBps"] / peak if peak else None
            report["speed"].append(row)
            print(json.dumps(row))
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report["correctness"]))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gpu_report.json")
