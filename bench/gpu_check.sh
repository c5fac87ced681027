#!/usr/bin/env bash
# The one GPU check of the project (issue 16), run on a GPU machine from the repository root:
#
#     bash bench/gpu_check.sh                 # results in $OUT (device tool) or bench/results/gpu-check
#     DZ_CHECK_DEVICE=cpu bash bench/gpu_check.sh   # the same parts on the CPU: checks this script
#
# Parts, each in its own process with its own timeout, so one failure keeps the others' results:
#   build      the native extension with its CUDA kernels for sm_90 (torch's own CUDA, no isolation)
#   info       python -m deepzero_kernels.info (device, backends, threads, budget)
#   selftest   every fused kernel of every backend against the reference, float32 and float64
#   kernels    tests/test_kernels.py on the device's targets (random and awkward shapes against the
#              float64 definition; before each call the allocator's free memory is filled with NaN
#              bytes, so an output element a kernel leaves unwritten shows)
#   engine     the estimators' exactness tests (tests/test_cge.py, tests/test_precision.py)
#   tf32       float32 CGE against the float64 loop with TF32 on and off (delta_precision.py --quick)
#   bandwidth  a device-to-device copy: the memory roofline the kernels are held against
#   bench      the benchmark's CGE workloads at GPU sizes (engine vs the paper's strategy and
#              backprop) and every fused kernel, as pytest-benchmark JSON
#   archs      the architecture group (ResNet-18 ... ViT, bench widths, batch 16): the engine against
#              the paper's strategy, with each method's conv/matmul FLOPs (archs-summary.json), the
#              run that tells whether the issue-15 ratios, bounded by those FLOP ratios on a CPU,
#              grow where K-batched launches fill a GPU (the naive loop left out for time)
# Then gpu_check_summary.py writes summary.json (one JSON: every part's status, selftest, tf32
# errors, bench medians and same-run ratios, each kernel's minimum bytes / time as a fraction of
# the copy bandwidth) and summary.md next to the logs.
set -u
cd "$(dirname "$0")/.."
DEV=${DZ_CHECK_DEVICE:-cuda}
RES=${OUT:-bench/results/gpu-check}
mkdir -p "$RES"
: > "$RES/parts.jsonl"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} DZ_CHECK_DEVICE=$DEV
PY=${PYTHON:-python3}
SIZE=(--full); [ "$DEV" = cpu ] && SIZE=(--quick)  # GPU sizes (ResNet-20 at batch 256); a CPU run only checks the script

part() {  # part NAME SECONDS COMMAND...: run, log, record rc and seconds
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  echo "{\"part\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >> "$RES/parts.jsonl"
  echo "   rc=$rc in $((SECONDS - t0))s"; tail -n 3 "$RES/$name.log" | sed 's/^/   /'
}

if [ "$DEV" = cuda ]; then
  part build 420 env DZ_NATIVE_REQUIRED=1 $PY -m pip install -q --no-build-isolation --no-deps -e .
fi
part info 120 $PY -m deepzero_kernels.info
part selftest 300 $PY -c "
import json, torch, deepzero_kernels as dz
out = {}
for b in ('native', 'triton'):
    for dt in (torch.float32, torch.float64):
        try:
            out[f'{b}-{str(dt)[6:]}'] = dz.selftest(b, '$DEV', dt)
        except Exception as e:
            out[f'{b}-{str(dt)[6:]}'] = {'(backend)': f'{type(e).__name__}: {e}'}
print(json.dumps(out, indent=1))
open('$RES/selftest.json', 'w').write(json.dumps(out))
"
part bandwidth 120 $PY -c "
import json, time, torch
dev = torch.device('$DEV'); n = (1 << 28) if dev.type == 'cuda' else (1 << 24)
a = torch.empty(n, dtype=torch.float32, device=dev); b = torch.empty_like(a)
sync = torch.cuda.synchronize if dev.type == 'cuda' else (lambda: None)
for _ in range(3): b.copy_(a)
sync(); t = time.perf_counter()
for _ in range(10): b.copy_(a)
sync(); s = (time.perf_counter() - t) / 10
json.dump({'copy_bytes_per_s': 2 * 4 * n / s}, open('$RES/bandwidth.json', 'w')); print(2 * 4 * n / s / 1e9, 'GB/s')
"
KSEL=cuda; [ "$DEV" = cpu ] && KSEL="native and linear_weight_ce"
part kernels 600 $PY -m pytest -q -x -p no:cacheprovider tests/test_kernels.py -k "$KSEL"
part engine 600 $PY -m pytest -q -x -p no:cacheprovider tests/test_precision.py tests/test_cge.py -k "not slow"
part tf32 420 $PY python/experiments/delta_precision.py --quick --out "$RES"
BSEL="(cnn_appB or resnet20_sampled or resnet20_layer3) and not no_reuse and not vmap"
part bench 600 $PY -m pytest -q -p no:cacheprovider bench/test_cge.py bench/test_kernels.py --benchmark-only \
  "${SIZE[@]}" -k "$BSEL or test_kernel" --benchmark-json="$RES/bench.json" --bench-summary "$RES/bench-summary.json"
ASIZE=(); [ "$DEV" = cpu ] && ASIZE=(--quick)  # default mode: the README's CPU table's sizes
part archs 300 $PY -m pytest -q -p no:cacheprovider bench/test_archs.py --benchmark-only "${ASIZE[@]}" \
  -k "not no_reuse" --benchmark-json="$RES/archs.json" --bench-summary "$RES/archs-summary.json"
$PY bench/gpu_check_summary.py "$RES"
