#!/usr/bin/env bash
# The paper presets' dry runs on a lent GPU (issue #29), as one prepared call, from the
# repository's root:
#
#     python kernels/gpu_wheels.py 00 08 05                     # here, once: the wheels it lacks
#     bash kernels/run_paper_dryrun_on_gpu.sh OUT_DIR 00 08 05  # there, with .whl carried
#
# Each chapter runs `replbook dryrun NN --layers full`: its paper models built from their
# public configs at full size (random weights), the paper preset's code path on the GPU, its
# time and its peak host and GPU memory. A chapter given as NN:L runs L layers deep instead
# (04's OPT-66B and Llama-2-70B: full width, as many layers as the time allows). Each chapter
# has its own time limit (DRYRUN_LIMIT seconds, default 240) and adds its entry to
# kernels/measurements/paper_dryrun_<gpu>.json, copied to OUT_DIR after every chapter, so a
# chapter that fails or runs out of time keeps the others'. Outputs never reach results/.
#
# The machine has no network: a chapter that reads the book's prepared data (the `data` cache
# that `replbook prepare` fills) finds it only if it is carried. DRYRUN_CACHE names a folder
# of the working tree laid out as that cache (e.g. .gpu-cache/data/flags-2576650b4568c8ee for chapter 06), to
# be carried with the call; the dry run links its `data`, `models` and `gguf` from there.
set -u
OUT=${1:?usage: bash kernels/run_paper_dryrun_on_gpu.sh OUT_DIR CHAPTER[:LAYERS] ...}
shift
CHAPTERS=${*:-00 08}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || { echo "the wheels in .whl/ did not install"; exit 1; }
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/lib:$PWD/kernels PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=agg
export REPLBOOK_CACHE=${REPLBOOK_CACHE:-/tmp/replbook-cache}
mkdir -p "$REPLBOOK_CACHE"
if [ -n "${DRYRUN_CACHE:-}" ]; then
  for part in data models gguf; do
    [ -d "$DRYRUN_CACHE/$part" ] && ln -sfn "$PWD/$DRYRUN_CACHE/$part" "$REPLBOOK_CACHE/$part"
  done
fi
# chapters 03, 07 and 09 read the CIFAR-10 test set: written into the cache from the book's own
# copy (data/cifar10-test.zip, checked; its registry source is gone), as `replbook prepare` does
case " $CHAPTERS " in
  *" 03"*|*" 07"*|*" 09"*) python3 -c "from replbook import data; data.cifar10_test()" ;;
esac
TAG=$(python3 -c "import torch; n = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'; print('h200' if 'H200' in n else 'h100' if 'H100' in n else n.split()[-1].lower())")
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1
  df -h . /tmp; free -g; nproc
  python3 -c "import sys, torch, transformers, papermill, ipykernel; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'papermill', papermill.__version__, 'ipykernel', ipykernel.__version__)"
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
for spec in $CHAPTERS; do
  chapter=${spec%%:*}
  layers=full
  [ "$spec" != "$chapter" ] && layers=${spec#*:}
  start=$(date +%s)
  echo "=== $chapter, layers $layers" >> "$OUT/dryrun.log"
  timeout "${DRYRUN_LIMIT:-240}" python3 -m replbook.cli dryrun "$chapter" --layers "$layers" >> "$OUT/dryrun.log" 2>&1
  status=$?
  echo "$chapter ($layers): exit $status after $(( $(date +%s) - start )) s" | tee -a "$OUT/dryrun.log"
  [ $status -ne 0 ] && tail -5 "$OUT/dryrun.log"
  cp "kernels/measurements/paper_dryrun_$TAG.json" "$OUT/" 2>/dev/null
done
rm -rf "$REPLBOOK_CACHE"/dryrun-hub  # the random-weight snapshots: tens of GB at full size
