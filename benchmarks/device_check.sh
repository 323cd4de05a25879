#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one call, for a session that is lent a GPU machine (the `device`
# tool; its image has python3 with torch, triton, h5py, safetensors, tqdm, einops, pytest, pytest-timeout):
#
#     run(command="bash benchmarks/device_check.sh", timeout_s=540)
#
# 1. tests/test_cuda.py with Triton's compiler (TRITON_INTERPRET=0): the kernel against the reference over
#    shapes in fp32 and at the benchmark shape in bf16, the sparse backward, `saelab train --device cuda`
#    with the Triton encode against the dense reference;
# 2. benchmarks/bench_encode.py --gpu-only: Triton / chunked / reference forward time, peak memory and
#    training-step time (bf16, B 4096, d_in 768, d_sae 32768, k 32; the target is >= 1.5x the reference);
# 3. `torchrun -m saelab train --device cuda` on one rank (one GPU): the nccl process group;
# 4. benchmarks/tune_triton.py: the Triton select methods' launch settings swept, and a profiled training
#    step per path (its whole output in $OUT/tune.log; the forward table is printed here).
# Measured on an H200 on 2026-11-30 (steps 1-3, ~3.5 min with the machine's start): README "GPU".
# saelab runs from this checkout (PYTHONPATH), nothing is installed or downloaded. Everything goes to
# $OUT/device_check.log too (the device tool brings $OUT back). Exit status: 0 when every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/device_check.log") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1
# the benchmarks' result files (bench_encode_gpu.json, tune_triton.json) come back with $OUT
export SAELAB_BENCH_RESULTS="$OUT/results"
PY=${PY:-python3}
failed=()
step() { echo; echo "== $1 ($(date -u +%H:%M:%S))"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY -c "import torch, triton; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| triton',
triton.__version__, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)" \
    || failed+=("imports")

step "1. tests/test_cuda.py (Triton compiled, on CUDA tensors)"
$PY -m pytest -q -m cuda -p no:cacheprovider -rs tests/test_cuda.py || failed+=("test_cuda")

step "2. bench_encode.py --gpu-only"
$PY benchmarks/bench_encode.py --gpu-only --reps 10 || failed+=("bench_encode")

step "3. torchrun, one rank on cuda (nccl)"
work=$(mktemp -d)
if $PY -m saelab synthetic --out "$work/planted" --rows 65536 --quiet \
    && NCCL_DEBUG=INFO $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m saelab train \
        --activations "$work/planted" --out "$work/ddp" --arch topk --k 8 --width 1024 --batch-size 1024 \
        --tokens 204800 --lr 3e-3 --device cuda --quiet >"$work/ddp.log" 2>&1; then
    grep -m3 "NCCL INFO" "$work/ddp.log" || { echo "no NCCL INFO line: was nccl used?"; failed+=("nccl"); }
    $PY -c "import json, sys; e = json.load(open(sys.argv[1])); print('eval:', {k: e[k] for k in ('fvu', 'l0', 'dead_frac')})" \
        "$work/ddp/eval.json" || failed+=("ddp eval")
else
    tail -40 "$work/ddp.log" 2>/dev/null
    failed+=("torchrun")
fi

step "4. tune_triton.py: both select methods' settings at the benchmark shape, a profiled training step (log: \$OUT/tune.log)"
timeout 200 $PY benchmarks/tune_triton.py --budget 100 --reps 10 >"$OUT/tune.log" 2>&1 || failed+=("tune_triton")
grep -v "^USDT" "$OUT/tune.log" | grep -B2 -A14 "^forward" | head -24

echo
if [ ${#failed[@]} -eq 0 ]; then echo "== device check: all passed"; else echo "== device check FAILED: ${failed[*]}"; fi
[ ${#failed[@]} -eq 0 ]
