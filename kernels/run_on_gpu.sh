#!/usr/bin/env bash
# Every GPU measurement the book keeps, in one prepared run on a lent GPU (about 6 minutes
# on an H200), from the repository's root:
#
#     bash kernels/run_on_gpu.sh OUT_DIR
#
# 1. Loki's kernels (chapter 08): compiled correctness, and the decoding step against dense
#    attention across contexts, batch 1 and 16, and the one-launch step at short contexts
#    (gpu_report loki -> loki_<gpu>.json);
# 2. Endor's decoders (chapter 04, C2): bit-exactness and throughput against the HBM roofline
#    and the host -> GPU copy, and whole transformer blocks decoded in one grouped launch
#    against one launch a matrix (gpu_report endor -> endor_<gpu>.json);
# 3. chapter 04's C3: offloaded inference, disk -> host -> GPU, at OPT-66B's and Llama-2-70B's
#    full width, two random-weight layers each, Endor against Accelerate, three repeats
#    (replbook.endor.offload_report_on_gpu -> endor_offload_<gpu>.json; the committed H200
#    record's first repeat ran in this script's run, the other two in a second call).
# Each step has its own time limit and writes its record when it ends, so a step that fails
# keeps the others' (the Loki step also keeps loki_<gpu>.partial.json, rewritten after each
# of its rows, so that a step cut off by its limit keeps what it measured). Wheels in .whl/ (the book's transformers pin, where the machine's
# differs) are installed first.
set -u
OUT=${1:?usage: bash kernels/run_on_gpu.sh OUT_DIR}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}lib:kernels PYTHONUNBUFFERED=1
TAG=$(python3 -c "import torch; n = torch.cuda.get_device_name(); print('h200' if 'H200' in n else 'h100' if 'H100' in n else n.split()[-1].lower())")
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  df -h . /tmp; free -g; nproc
  python3 -c "import torch, triton, transformers, accelerate; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
timeout 240 python3 -m replbook_kernels.gpu_report "$OUT" loki > "$OUT/loki.log" 2>&1; echo "loki: exit $?"; tail -3 "$OUT/loki.log"
timeout 160 python3 -m replbook_kernels.gpu_report "$OUT" endor > "$OUT/endor.log" 2>&1; echo "endor: exit $?"; tail -2 "$OUT/endor.log"
# the offload files go on the machine's disk (the working folder), not into OUT
timeout 420 python3 -c "
from replbook import endor
endor.offload_report_on_gpu('$OUT/endor_offload_$TAG.json', '.offload-scratch',
                            {'facebook/opt-66b': 2, 'meta-llama/Llama-2-70b-hf': 2}, repeats=3)
" > "$OUT/offload.log" 2>&1; echo "offload: exit $?"; tail -4 "$OUT/offload.log"
rm -rf .offload-scratch
