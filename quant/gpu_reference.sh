#!/usr/bin/env bash
# Train the GPU reference model (vit_cifar_small) within one device-tool command (10 minutes at most),
# or two (PART=1, PART=2: below).
#
# Here:      mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.gz .data/   (.data/ is git-ignored)
# On the GPU (device tool, carry [".data"], timeout_s 600):
#            bash quant/gpu_reference.sh
# or, sharing the call with the kernel tests (they time nothing, so the two can share the GPU):
#            bash quant/gpu_reference.sh & WARM_DEADLINE=540 OMP_NUM_THREADS=2 nice -n 19 bash cuda_ops/gpu_session.sh tests; wait
#            (the tests niced and at 2 threads a worker, so that they take no CPU time from training)
#
# It trains for TIME_BUDGET seconds of steps (default 390; the learning rate's cosine decays over what
# the warmup leaves of them, see `python -m quant.train --time-budget`; the budget is checked at epoch
# ends, and the first step, which compiles, is not charged to it) or 300 epochs, whichever comes
# first, stopping anyway at the last epoch that ends within TIME_LIMIT seconds (default 500) of this
# script's start (counted from when training starts, after the data is loaded: a few tens of seconds
# later; the budget shrinks to fit, so that the learning rate still decays fully,
# `--end-within-time-limit`); then scores the test and val splits (until 590 s after the start at
# most) and copies the model, its training log and curves and both scores to $OUT: model.safetensors,
# log.jsonl, curves.png, train.log, test.json, val.json. About 8-9 minutes in all, so that a 15-minute lease keeps time for a
# short kernel benchmark after it (README, "GPU runs").
# Arguments go on to quant.train after the recipe's own, so they override it (smoke test on a CPU:
# `DATA=some/image/tree TIME_BUDGET=5 BATCH=8 bash quant/gpu_reference.sh --device cpu`). A warm restart
# from the shipped model, which is how training goes on across leases (each starts bare, but the checkout
# travels): `bash quant/gpu_reference.sh --init assets/vit_cifar_small.safetensors --lr 1e-3 --warmup-epochs 5`.
# TEACHER_BUDGET=S first trains a CNN teacher (`quant.teacher`, resnet_cifar) for S of those seconds and
# distils the ViT from its hard predictions for the rest (DeiT's recipe); its log joins train.log.
# A machine lent for 10-minute commands starts bare each time, and the resume state (weights plus
# AdamW moments) is too big to come back through $OUT, so the run is sized to end in one call -- or in two
# calls back to back on the same warm machine, which keeps runs/ between calls (about 11 minutes of
# training in a 15-minute lease instead of 6.5):
#   PART=1 TIME_BUDGET=660 bash quant/gpu_reference.sh     (timeout_s 600: trains until TIME_LIMIT, default
#                                                           520 s, and keeps the resume state; no scores)
#   PART=2 TIME_BUDGET=660 bash quant/gpu_reference.sh     (at once, timeout_s = what the lease has left less
#                                                           10 s: resumes, finishes the schedule by TIME_LIMIT,
#                                                           default 200 s, shrinking it to fit, and scores by
#                                                           TIME_LIMIT + 70 s: set TIME_LIMIT = timeout_s - 70)
# Both parts need the same TIME_BUDGET, TEACHER_BUDGET and arguments (else quant.train refuses to resume);
# a teacher is trained in part 1 only. PART=2 without part 1's resume state on the machine stops at once;
# a model that did not finish its schedule is still scored and handed back, with a warning.
# A schedule cannot span two leases: the resume state (46 MB for vit_cifar_small) with the data (19 MB) and
# the tracked files (33 MB) is over the 64 MiB a call may carry. PART=1 hands back its log only.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-.data/cifar10-jpeg.tar.gz}
RUN=${RUN:-runs/gpu_small}
OUT=${OUT:-$RUN/out}
PY=${PYTHON:-python3}
BATCH=${BATCH:-512}
export PYTHONUNBUFFERED=1

quiet() { tr '\r' '\n' | grep -v "step/s\|s/step\|img/s\|batch/s\|s/batch\|^ *$" || true; }  # drop tqdm's redraws
left_until() { local s=$(($1 - SECONDS)); echo $((s > 1 ? s : 1)); }  # seconds from now to $1 s after the start
budget=${TIME_BUDGET:-390}
PART=${PART:-}
case "$PART" in
    "") limit=${TIME_LIMIT:-500}; score_by=590; fit=(--end-within-time-limit) ;;
    1) limit=${TIME_LIMIT:-520}; fit=() ;;  # stop at the limit, resume state kept, schedule unchanged
    2) limit=${TIME_LIMIT:-200}; score_by=$((limit + 70)); fit=(--end-within-time-limit) ;;
    *) echo "PART must be 1, 2 or unset, got '$PART'" >&2; exit 2 ;;
esac
whole() {  # bash arithmetic below takes whole numbers only: refuse anything else before any work
    [[ $2 =~ ^[0-9]+$ ]] || { echo "error: $1 must be a whole number, got '$2'" >&2; exit 2; }
}
whole TIME_LIMIT "$limit"; whole TEACHER_BUDGET "${TEACHER_BUDGET:-0}"
# 0 would be quant.train's schedule by epochs, which --end-within-time-limit (PART unset or 2) refuses
[[ $budget =~ ^[1-9][0-9]*$ ]] || { echo "error: TIME_BUDGET must be a positive whole number of seconds, got '$budget'" >&2; exit 2; }
[[ $BATCH =~ ^[1-9][0-9]*$ ]] || { echo "error: BATCH must be a positive whole number, got '$BATCH'" >&2; exit 2; }
if [ "$PART" = 2 ] && [ ! -f "$RUN/last.pt" ]; then
    echo "PART=2: no $RUN/last.pt here; run PART=1 first, on the same machine while it is warm" >&2
    exit 1
fi
[ -e "$DATA" ] || { echo "error: no data at $DATA (here: copy it into .data/, see this script's header)" >&2; exit 2; }
if [[ " $* " != *" --device "* && " $* " != *" --device="* ]] && ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "error: torch sees no CUDA device; this script trains the GPU reference (a smoke test on a CPU: add --device cpu)" >&2
    exit 2
fi
mkdir -p "$OUT"
distill=()
: > "$OUT/train.log"
if [ "${TEACHER_BUDGET:-0}" != 0 ] && [ "$PART" != 2 ]; then
    # DeiT-style: a CNN teacher first, out of the same budget
    "$PY" -m quant.train --model resnet_cifar --data "$DATA" --out "$RUN-teacher" --epochs 60 \
        --time-budget "$TEACHER_BUDGET" --save-every 10 --batch-size "$BATCH" --lr 4e-3 --warmup-epochs 2 \
        --mixup 0 --cutmix 0 2>&1 | quiet >> "$OUT/train.log" || true
    if [ ! -f "$RUN-teacher/model.safetensors" ]; then  # no teacher: the ViT trains undistilled
        echo "teacher training failed (see above); training the ViT without distillation" | tee -a "$OUT/train.log"
    fi
fi
if [ "${TEACHER_BUDGET:-0}" != 0 ] && [ -f "$RUN-teacher/model.safetensors" ]; then  # (PART=2: part 1's)
    distill=(--teacher "$RUN-teacher/model.safetensors" --distill hard)
    budget=$(awk -v b="$budget" -v t="$TEACHER_BUDGET" 'BEGIN { print (b - t > 60 ? b - t : 60) }')
fi
train_vit() {
    "$PY" -m quant.train --model vit_cifar_small --data "$DATA" --out "$RUN" \
        --epochs 300 --time-budget "$budget" --time-limit "$(left_until "$limit")" "${fit[@]}" \
        --save-every 25 \
        --batch-size "$BATCH" --lr 2e-3 --warmup-epochs 10 --drop-path 0.1 \
        --mixup 0.8 --cutmix 1.0 --mix-prob 0.5 "${distill[@]}" "$@" 2>&1 | quiet >> "$OUT/train.log" || true
}
train_vit "$@"
if [ ! -f "$RUN/model.safetensors" ] && [ ! -f "$RUN/last.pt" ] && [ "$SECONDS" -lt 240 ]; then
    # failed before its first checkpoint, early: most likely torch.compile on this machine's stack
    echo "training failed early (see above); again without torch.compile" | tee -a "$OUT/train.log"
    rm -f "$RUN/log.jsonl"  # epochs the failed run may have logged
    TORCH_COMPILE_DISABLE=1 train_vit "$@"
fi
tail -n 5 "$OUT/train.log"  # the last epochs, or the error that ended training
if [ ! -f "$RUN/model.safetensors" ]; then
    echo "reference model: training failed (see $OUT/train.log)"
    exit 1
fi
if [ "$PART" = 1 ]; then  # the resume state stays on the machine for PART=2
    cp "$RUN/log.jsonl" "$OUT/"
    echo "part 1 done: run PART=2 with the same TIME_BUDGET at once, while the machine keeps $RUN/last.pt"
    exit 0
fi
cp "$RUN/model.safetensors" "$RUN/log.jsonl" "$RUN/curves.png" "$OUT/"  # back first: the scores below can be redone here
complete=$("$PY" -c "import sys; from safetensors import safe_open
print((safe_open(sys.argv[1], 'pt').metadata() or {}).get('complete', '?'))" "$RUN/model.safetensors")
if [ "$complete" != true ]; then
    echo "WARNING: the model did not finish its schedule (complete=$complete; see train.log); scoring it anyway" \
        | tee -a "$OUT/train.log"
fi
for split in test val; do  # the test score first: the one the card needs
    timeout "$(left_until "$score_by")" "$PY" -m quant.evaluate --checkpoint "$RUN/model.safetensors" --data "$DATA" \
        --split "$split" --json "$OUT/$split.json" --confusion "$RUN/$split.confusion.png" 2>&1 | tr '\r' '\n' | tail -n 1 || true
done
echo "reference model done"
