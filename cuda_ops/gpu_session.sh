#!/usr/bin/env bash
# Every pending GPU check and benchmark of cuda_ops/, in one script for a CUDA machine; results go to $OUT.
#
#   bash cuda_ops/gpu_session.sh tests            # ~4-7 min: the kernel tests on the GPU (WARM_DEADLINE: then warming)
#   bash cuda_ops/gpu_session.sh bench [ARGS]     # <= 9.5 min: Triton's compile cache filled in parallel (WARM_TIME,
#                                                 # 100 s), then python -m cuda_ops.bench --device cuda [ARGS]
#   bash cuda_ops/gpu_session.sh profile          # ~3 min: Nsight Compute on ViT-B fc1, bf16 vs ternary (2-bit, base-3)
#   bash cuda_ops/gpu_session.sh parity [ARGS]    # ~2 min: python -m cuda_ops.parity on the GPU kernels
#   bash cuda_ops/gpu_session.sh all              # tests, then bench (where a command may run > 10 min)
#
# Through the device tool (15 minutes of device time a task, machine start included; 10 minutes a
# command; 8 files back from $OUT; the machine goes back 30 s after a call), make back-to-back calls:
# `bench` (its defaults WARM_TIME=100 BENCH_TIME_LIMIT=420 BENCH_TIMEOUT=470 fit timeout_s 600; it
# checks each op it times against the op's CPU kernel), then at once `tests` with TESTS_TIMEOUT set to what
# is left less 60 s. Warming: the bench tunes every op at every shape, each tiling compiled (0.6 s each on a
# 2-core VM, serially, in the bench's own process) before it is timed: some 360 for ViT-B's op shapes alone
# (`cuda_ops.triton_kernels.a8_candidates`: 32 tilings at M = 197, 12 at larger M, for each of five A8 ops),
# minutes of a 10-minute call. So `bench` first compiles them in 12 processes side by side (one per op
# for the op shapes, one per quantized variant for ViT-B end to end; BITVIT_TUNE=compile: each tiling
# launched once, nothing timed or kept) into Triton's on-disk cache, which the bench then reads. A lease
# shared with the reference model runs `tests` beside its training (README, "GPU runs") and a short
# bench after it (no warming: `tests` did it), its limit what the lease has left less 60 s (here 150 s
# left: timeout_s 150):
#   WARM_TIME=0 BENCH_TIME_LIMIT=90 BENCH_TIMEOUT=120 bash cuda_ops/gpu_session.sh bench \
#       --models vit_base_patch16_224,vit_large_patch16_224 --batches 1,64 --ops dense,w1.58a8,w1.58a8-b3,w1a8 \
#       --e2e-models vit_base_patch16_224 --variants fp,w1.58a8,w1.58a8-b3
# The op shapes run at batches 1 and 64 (the targets' M) before 8 and 256, so a time limit cuts those first.
# Whatever a time limit cut short is listed under "skipped" in cuda_bench.json, for the next lease; the
# JSON is rewritten after every shape and variant, so a run killed by BENCH_TIMEOUT keeps what it measured
# (marked "complete": false).
#
# tests: tests/test_cuda_ops.py, tests/test_to_kernels.py (CPU and gpu-marked tests) and
#   tests/triton_checks.py (the Triton kernels against float64 references with poisoned outputs, every
#   tuning candidate on ViT-sized shapes), untuned (BITVIT_TUNE=0) except the tuner's own test, on
#   pytest-xdist workers when the machine has it; then, with WARM_DEADLINE=S (default 0: off), warms
#   Triton's cache until S s after the call's start for a short bench later in the lease, as `bench`
#   does first (the lease shared with the reference model: WARM_DEADLINE=540).  -> env.txt, tests.log, tests.xml
# bench: the ceilings, per-op timings (autotuning each shape first), end-to-end latency and weight
#   memory, and issue 4's targets.  -> env.txt, cuda_bench.json, cuda_bench.png, bench.log (tables),
#   bench.err (progress, warnings)
# profile: ncu (clocks left as they are) on the CUDA-graph replays of dense bf16, w1.58a8 and w1.58a8-b3 at ViT-B's
#   fc1 for M = 197 and 12,608: speed of light, memory and compute workload, occupancy, launch stats.
#   -> env.txt, profile.ncu-rep, profile.txt, profile.log
# parity: vit_cifar_tiny's w8a8/w4a8/w4/nf4/w2 versions and every packed model in assets/, scored on the
#   test split with QuantLinear's reference forward and on the Triton kernels (fp32 models). Needs the
#   data: here, `mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.gz .data/` and carry [".data"].
#   -> env.txt, cuda_parity_gpu.json, parity.log
# Then, on the machine the results come back to: copy cuda_bench.json and cuda_bench.png to
# assets/results/ and the tables into cuda_ops/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:-all}
shift || true
OUT=${OUT:-gpu_out}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

env_report() {
    {
        date -u +"%Y-%m-%dT%H:%M:%SZ"
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
        "$PY" -c "import sys, torch, triton
gpu = ((torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, 'SMs')
       if torch.cuda.is_available() else ('no CUDA device',))
print('python', sys.version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__, '| cuda',
      torch.version.cuda, '|', *gpu)" 2>&1
        "$PY" -c "import xdist; print('pytest-xdist', xdist.__version__)" 2>&1 | tail -1
        "$PY" -c "from quant.cli import commit
print('commit', commit() or 'unknown (no .git of its own here: give BITVIT_COMMIT=<hash> in the command)')" 2>&1
    } > "$OUT/env.txt"
    cat "$OUT/env.txt"
}

run_tests() {
    local workers=()
    "$PY" -c "import xdist" 2>/dev/null && workers=(-n "${WORKERS:-8}")
    # -q -ra come from pyproject's addopts (given twice, -qq drops the "N passed, M skipped" line); at the
    # time limit SIGINT, not SIGTERM, so that pytest still prints its failures and writes tests.xml
    BITVIT_TUNE=0 timeout --signal=INT --kill-after=30 "${TESTS_TIMEOUT:-540}" "$PY" -m pytest -p no:cacheprovider \
        "${workers[@]}" \
        --junitxml "$OUT/tests.xml" tests/test_cuda_ops.py tests/test_to_kernels.py tests/triton_checks.py \
        > "$OUT/tests.log" 2>&1
    local rc=$?
    tail -n 40 "$OUT/tests.log"
    echo "tests: exit code $rc"
    warm_cache $(( ${WARM_DEADLINE:-0} - SECONDS ))  # only when a bench follows in this lease (see the header)
    return $rc
}

warm_run() {  # warm_run SECONDS NAME BENCH-ARGS...: one compile-only bench run (BITVIT_TUNE=compile)
    local seconds=$1 name=$2
    shift 2
    BITVIT_TUNE=compile timeout "$seconds" "$PY" -m cuda_ops.bench --device cuda --quick --batches 1,8,64,256 \
        "$@" --out "/tmp/bitvit-warm-$name.json" > "/tmp/bitvit-warm-$name.log" 2>&1
}

warm_cache() {  # compile the bench's tilings into Triton's cache for $1 s at most, in parallel (see the header)
    # The ViT-B shapes stand for ViT-S and ViT-L too (the same M; widths specialise alike, as multiples of 16).
    local seconds=$1 op
    if [ "$seconds" -lt 30 ]; then echo "warm: skipped, ${seconds} s"; return 0; fi
    rm -f /tmp/bitvit-warm-*.json
    for op in w1.58a8 w1.58a8-b3 w1a8 w8a8 w4a8 w4; do
        warm_run "$seconds" "ops-$op" --models vit_base_patch16_224 --ops "$op" --e2e-models "" &
        warm_run "$seconds" "e2e-$op" --models "" --e2e-models vit_base_patch16_224 --variants "$op" &
    done
    wait
    echo "warm: Triton's compile cache filled for the bench's ViT-B shapes ($SECONDS s into the call;" \
         "$(grep -l '"complete": true' /tmp/bitvit-warm-*.json 2>/dev/null | wc -l) of 12 warming runs finished)"
}

run_bench() {
    warm_cache "${WARM_TIME:-100}"
    timeout "${BENCH_TIMEOUT:-470}" "$PY" -m cuda_ops.bench --device cuda --time-limit "${BENCH_TIME_LIMIT:-420}" \
        --out "$OUT/cuda_bench.json" --plot "$OUT/cuda_bench.png" "$@" > "$OUT/bench.log" 2> "$OUT/bench.err"
    local rc=$?
    cat "$OUT/bench.log"
    tr "\r" "\n" < "$OUT/bench.err" | grep -v "it/s\|s/it" | tail -n 5  # tqdm's redraws are one \r-joined line
    echo "bench: exit code $rc"
    return $rc
}

run_profile() {
    local ncu
    ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -n 1)
    if [ -z "$ncu" ]; then echo "profile: ncu not found"; return 1; fi
    local ranges=()  # push/pop NVTX ranges are named with a trailing slash; the bench opens one per op and shape
    for op in dense w1.58a8 w1.58a8-b3; do
        for m in 197 12608; do ranges+=(--nvtx-include "profile $op vit_base_patch16_224 fc1 M=$m/"); done
    done
    timeout "${PROFILE_TIMEOUT:-540}" "$ncu" --clock-control none --nvtx "${ranges[@]}" --launch-count 16 \
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
        --section Occupancy --section LaunchStats -f -o "$OUT/profile" \
        "$PY" -m cuda_ops.bench --device cuda --models vit_base_patch16_224 --batches 1,64 --ops dense,w1.58a8,w1.58a8-b3 \
        --e2e-models "" > "$OUT/profile.log" 2>&1
    local rc=$?
    "$ncu" -i "$OUT/profile.ncu-rep" --page details > "$OUT/profile.txt" 2>&1
    grep -E "^  [a-zA-Z_].*\(|Duration|Memory Throughput|Compute \(SM\) Throughput|DRAM Throughput|Registers Per|Achieved Occupancy" \
        "$OUT/profile.txt" | head -n 80
    tail -n 5 "$OUT/profile.log"
    echo "profile: exit code $rc"
    return $rc
}

run_parity() {
    local files
    files=$("$PY" -c "import glob
from safetensors import safe_open
from quant.packfile import is_quantized_format
packed = lambda p: is_quantized_format((safe_open(p, 'pt').metadata() or {}).get('format'))
print(','.join(p for p in sorted(glob.glob('assets/*.safetensors')) if packed(p)))")  # the packed models
    BITVIT_TUNE=0 timeout "${PARITY_TIMEOUT:-540}" "$PY" -m cuda_ops.parity --model assets/vit_cifar_tiny.safetensors \
        --quantized "$files" --data "${DATA:-.data/cifar10-jpeg.tar.gz}" --split test \
        --out "$OUT/cuda_parity_gpu.json" "$@" > "$OUT/parity.log" 2>&1
    local rc=$?
    tr "\r" "\n" < "$OUT/parity.log" | grep -v "batch/s\|s/batch" | tail -n 20
    echo "parity: exit code $rc"
    return $rc
}

case "$STAGE" in
    tests|bench|profile|parity|all) ;;
    *) echo "usage: bash cuda_ops/gpu_session.sh tests|bench|profile|parity|all [arguments]" >&2; exit 2 ;;
esac
for v in WORKERS TESTS_TIMEOUT WARM_DEADLINE WARM_TIME BENCH_TIMEOUT BENCH_TIME_LIMIT PROFILE_TIMEOUT PARITY_TIMEOUT; do
    [ -z "${!v:-}" ] || [[ ${!v} =~ ^[0-9]+$ ]] || { echo "error: $v must be a whole number, got ${!v}" >&2; exit 2; }
done
[ ! -e "$OUT" ] || [ -d "$OUT" ] || { echo "error: OUT=$OUT is a file, not a folder" >&2; exit 2; }
mkdir -p "$OUT"
env_report
# every stage times or checks the CUDA kernels: without a device, bench would warm for minutes, parity run on the CPU
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "error: torch sees no CUDA device (see $OUT/env.txt); this script runs on a CUDA machine" >&2
    exit 2
fi
case "$STAGE" in
    tests) run_tests ;;
    bench) run_bench "$@" ;;
    profile) run_profile ;;
    parity) run_parity "$@" ;;
    all) run_tests; t=$?; run_bench "$@"; b=$?; exit $((t || b)) ;;
esac
