#!/usr/bin/env bash
# All of bitvit's QAT result runs, one after another, from the reference model as teacher:
#   w1.58a8 (ternary, the shipped model), w1a8 (binary), qvit at a 3-bit and a 4-bit BitOPs budget, and
#   (CPU profile) lsq-w4, LSQ+ with every width at 4 bits: the fixed-width baseline of Q-ViT's search.
# Each run trains (`python -m quant.qat`), packs, scores the packed file on the test split and records
# itself in $RESULTS. A run already recorded there (and whose file exists) is skipped; an interrupted
# run resumes from $RUNS/<name>/ when the script is called again. Pick the runs with ONLY="w1a8 qvit-w3".
#
#   PROFILE=cpu  (default) schedules for a 2-core CPU that meet the QAT targets on the shipped reference:
#                all 45,000 training images, w1.58a8 8 epochs, w1a8 5, qvit-w3 4, qvit-w4 and lsq 3 (15-40 minutes
#                a run at 85-165 images/s on an idle 2-core CPU). LIMIT=N trains on a class-balanced subset and
#                EPOCHS=N sets every run's epochs (quick trials).
#   PROFILE=gpu  for one GPU lent for a fixed time (one 10-minute device command for all four runs), the
#                teacher by default the GPU reference assets/vit_cifar_small.safetensors:
#                all 45,000 training images, batch 512, at most 30 epochs within TIME_BUDGET seconds of
#                training a run (default 75, compiling not counted; `python -m quant.qat --time-budget`),
#                val scored and the resume state written every SAVE_EVERY (5) epochs.
#                A run is forecast to take its budget plus 60 s, or as long as the last run if that took
#                longer; one that would not end within DEADLINE seconds of the script's start (default
#                540) is skipped. With $OUT set (the device tool sets it) each run's results go there as
#                soon as it is recorded: qat.json, its packed model and a Q-ViT run's allocation (JSON;
#                plot it here with quant.qvit.plot_allocation), 7 files at most; a model packed but not
#                scored comes back too, to be scored here. Its packed files keep the parameters left in
#                floating point in float16 (`quant.qat --float16`; FLOAT16=0 for float32): vit_cifar_small's
#                ternary file is then 13.7x smaller than its float32 model instead of 10.4x
#                (quant/README.md, "Whole files").
# Exit status 0 when every run is recorded, 1 when one was skipped or did not finish.
#
# Outputs, named after the teacher's file (TEACHER=assets/NAME.safetensors): $RESULTS
# (assets/results/qat.json), the shipped ternary model assets/NAME-w1.58a8.safetensors, the Q-ViT bit
# allocations (JSON + plot) in assets/results/, the other packed models in $RUNS/. EVAL_LIMIT=N scores
# N test images only (dry runs).
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE=${PROFILE:-cpu}
RUNS=${RUNS:-runs/qat-$PROFILE}
DATA=${DATA:-.data/cifar10-jpeg.tar.gz}  # the JPEG copy inside the checkout (the device machine gets it carried)
if [ "$PROFILE" = gpu ]; then
    TEACHER=${TEACHER:-assets/vit_cifar_small.safetensors}  # the GPU reference
    RESULTS=${RESULTS:-$RUNS/qat.json}                      # a GPU run's results start fresh
    ONLY=${ONLY:-"w1.58a8 w1a8 qvit-w3 qvit-w4"}            # what one 10-minute call holds
else
    TEACHER=${TEACHER:-assets/vit_cifar_tiny.safetensors}
    RESULTS=${RESULTS:-assets/results/qat.json}
    ONLY=${ONLY:-"w1.58a8 w1a8 qvit-w3 qvit-w4 lsq-w4"}
fi
ASSETS=${ASSETS:-assets}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

case "$PROFILE" in
  cpu) # name: training images (0: all), epochs (qvit: 2 searching bit-widths, the rest fine-tuning)
       declare -A LIMIT=([w1.58a8]=${LIMIT:-0} [w1a8]=${LIMIT:-0} [qvit-w4]=${LIMIT:-0} [qvit-w3]=${LIMIT:-0}
                         [lsq-w4]=${LIMIT:-0})
       declare -A EPOCHS_OF=([w1.58a8]=${EPOCHS:-8} [w1a8]=${EPOCHS:-5} [qvit-w4]=${EPOCHS:-3} [qvit-w3]=${EPOCHS:-4}
                             [lsq-w4]=${EPOCHS:-3})
       BATCH=${BATCH:-128}; LR=${LR:-1e-3}; VAL_LIMIT=${VAL_LIMIT:-500}
       EXTRA=(--threads "${THREADS:-2}" --warmup-epochs 0.25) ;;
  gpu) declare -A LIMIT=([w1.58a8]=${LIMIT:-0} [w1a8]=${LIMIT:-0} [qvit-w4]=${LIMIT:-0} [qvit-w3]=${LIMIT:-0}
                         [lsq-w4]=${LIMIT:-0})
       declare -A EPOCHS_OF=([w1.58a8]=${EPOCHS:-30} [w1a8]=${EPOCHS:-30} [qvit-w4]=${EPOCHS:-30} [qvit-w3]=${EPOCHS:-30}
                             [lsq-w4]=${EPOCHS:-30})
       BATCH=${BATCH:-512}; LR=${LR:-1e-3}; VAL_LIMIT=${VAL_LIMIT:-5000}
       # val scored and the resume state written every 5 epochs: uncharged to the budget, each costs seconds
       EXTRA=(--time-budget "${TIME_BUDGET:=75}" --warmup-epochs 2 --save-every "${SAVE_EVERY:-5}")
       [ "${FLOAT16:-1}" = 1 ] && EXTRA+=(--float16)
       # a run takes its budget plus about 60 s (data, compiling, scoring); the call's 600 s hold them all
       DEADLINE=${DEADLINE:-540} ;;
  *) echo "PROFILE must be cpu or gpu" >&2; exit 2 ;;
esac
for v in TIME_BUDGET DEADLINE; do  # bash arithmetic below: a fraction there ended the loop unrun, "all done"
    [ -z "${!v:-}" ] || [[ ${!v} =~ ^[0-9]+$ ]] || { echo "error: $v must be whole seconds, got ${!v}" >&2; exit 2; }
done
for v in EPOCHS BATCH THREADS LIMIT VAL_LIMIT EVAL_LIMIT SAVE_EVERY; do  # counts, checked once rather than failing every run
    [ -z "${!v:-}" ] || [[ ${!v} =~ ^[0-9]+$ ]] || { echo "error: $v must be a whole number, got ${!v}" >&2; exit 2; }
done
[[ $LR =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || { echo "error: LR must be a number, got $LR" >&2; exit 2; }
[ -f "$TEACHER" ] || { echo "error: teacher $TEACHER not found (set TEACHER=...)" >&2; exit 2; }
[ -e "$DATA" ] || { echo "error: data $DATA not found (set DATA=...)" >&2; exit 2; }
for name in $ONLY; do  # every name checked before the first run starts
    [ -n "${EPOCHS_OF[$name]:-}" ] || { echo "error: unknown run $name (runs: ${!EPOCHS_OF[*]})" >&2; exit 2; }
done

recorded() {  # is run $1 in $RESULTS, and its file present?
    [ -f "$2" ] && [ -f "$RESULTS" ] && "$PY" - "$1" "$RESULTS" <<'PY'
import json, sys  # a damaged results file records nothing here; quant.qat refuses it with a message
try:
    runs = json.load(open(sys.argv[2])).get("runs", {})
except (OSError, ValueError, AttributeError):
    runs = {}
sys.exit(0 if isinstance(runs, dict) and sys.argv[1] in runs else 1)
PY
}

quiet() {  # progress bars on a terminal; in a log, every line but the bars' updates
    if [ -t 1 ]; then cat; else tr '\r' '\n' | grep --line-buffered -vE '[0-9]+/[0-9]+ \[' || true; fi
}

bring_back() {  # on a lent machine ($OUT set), copy $RESULTS and the files named that exist there at once
    [ -n "${OUT:-}" ] || return 0
    mkdir -p "$OUT"
    local f
    for f in "$RESULTS" "$@"; do if [ -f "$f" ]; then cp "$f" "$OUT/"; fi; done
}

all_done=1
took=0  # seconds the last run took, compiling included: the next one's forecast when above budget + 60
stem=$(basename "$TEACHER" .safetensors)
for name in $ONLY; do
    case "$name" in
      w1.58a8) recipe=w1.58a8; set_=(); out="$ASSETS/$stem-w1.58a8.safetensors" ;;
      w1a8)    recipe=w1a8;    set_=(); out="$RUNS/$stem-w1a8.safetensors" ;;
      qvit-w4) recipe=qvit;    set_=(--set budget_bits=4); out="$RUNS/$stem-qvit-w4.safetensors" ;;
      qvit-w3) recipe=qvit;    set_=(--set budget_bits=3); out="$RUNS/$stem-qvit-w3.safetensors" ;;
      lsq-w4)  recipe=lsq;     set_=(--set budget_bits=4); out="$RUNS/$stem-lsq-w4.safetensors" ;;
    esac
    if [ -z "${FORCE:-}" ] && recorded "$name" "$out"; then echo "== $name: recorded, skipped"; continue; fi
    need=$((${TIME_BUDGET:-0} + 60 > took ? ${TIME_BUDGET:-0} + 60 : took))
    if [ -n "${DEADLINE:-}" ] && [ $((SECONDS + need)) -gt "$DEADLINE" ]; then
        all_done=0; echo "== $name: skipped, it would not end within DEADLINE=$DEADLINE s"; continue
    fi
    started=$SECONDS
    limit=()
    [ "${LIMIT[$name]}" != 0 ] && limit=(--limit "${LIMIT[$name]}")
    echo "== $name ($PROFILE profile)"
    mkdir -p "$RUNS"
    # Q-ViT on the GPU trains eagerly: in a CPU rehearsal on a small ViT, inductor took over 12 minutes to
    # compile a Q-ViT student's graph (one a stage, two a run) against 1-2 for the other students; a
    # compile that long would eat the 10-minute call (compiling is not charged to the run's budget, but
    # it takes its time), and eager, a CIFAR-sized model is launch-bound anyway.
    eager=()
    if [ "$PROFILE" = gpu ] && [ "$recipe" != w1.58a8 ] && [ "$recipe" != w1a8 ]; then  # Q-ViT's layers
        eager=(TORCH_COMPILE_DISABLE=1)
    fi
    stamp=$(mktemp)  # files newer than this were written by this run ($out may be a model already shipped)
    env "${eager[@]}" "$PY" -m quant.qat --teacher "$TEACHER" --recipe "$recipe" "${set_[@]}" --data "$DATA" --out "$out" \
        --run-dir "$RUNS/$name" "${limit[@]}" --epochs "${EPOCHS_OF[$name]}" --batch-size "$BATCH" --lr "$LR" \
        --val-limit "$VAL_LIMIT" --eval-split test ${EVAL_LIMIT:+--eval-limit "$EVAL_LIMIT"} \
        --results "$RESULTS" --name "$name" "${EXTRA[@]}" 2>&1 | quiet || true
    took=$((SECONDS - started))
    if ! recorded "$name" "$out"; then  # a packed file not yet scored still comes back, to be scored here
        all_done=0; echo "== $name: not finished (rerun to resume)"
        packed=(); if [ "$out" -nt "$stamp" ]; then packed=("$out"); fi  # written by this run, not a shipped one
        bring_back "${packed[@]}"; rm -f "$stamp"; continue
    fi
    rm -f "$stamp"
    if [ -f "$out.bits.json" ]; then  # Q-ViT's layers (qvit, lsq): the widths
        cp "$out.bits.json" "$(dirname "$RESULTS")/qat-$name.bits.json"
        cp "$out.bits.png" "$(dirname "$RESULTS")/qat-$name.bits.png"
    fi
    bring_back "$out" "$(dirname "$RESULTS")/qat-$name.bits.json"  # the allocation: Q-ViT runs have one
done
[ "$all_done" = 1 ] && echo "all QAT runs done"
