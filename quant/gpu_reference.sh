#!/usr/bin/env bash
# Train the GPU reference model (vit_cifar_small) on one GPU within the device tool's 10-minute commands.
#
# Here:      mkdir -p .data && cp ../shared/data/cifar10-jpeg.tar.gz .data/   (.data/ is git-ignored)
# On the GPU (device tool, carry [".data"]), repeat until it prints "reference model done":
#            bash quant/gpu_reference.sh
# Each call trains for at most $TIME_LIMIT seconds and resumes from runs/gpu_small/last.pt (kept on
# the warm machine between calls); when all epochs are done it scores the val split and copies the
# model, its log and its val score to $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-.data/cifar10-jpeg.tar.gz}
RUN=${RUN:-runs/gpu_small}
export PYTHONUNBUFFERED=1
python -m quant.train --model vit_cifar_small --data "$DATA" --out "$RUN" \
    --epochs 300 --batch-size 512 --lr 2e-3 --warmup-epochs 10 --drop-path 0.1 \
    --mixup 0.8 --cutmix 1.0 --mix-prob 0.5 --time-limit "${TIME_LIMIT:-520}" 2>&1 | grep -v "step/s" || true
if [ -f "$RUN/model.safetensors" ]; then
    python -m quant.evaluate --checkpoint "$RUN/model.safetensors" --data "$DATA" --split val \
        --json "$RUN/val.json"
    mkdir -p "${OUT:-$RUN/out}"
    cp "$RUN/model.safetensors" "$RUN/log.jsonl" "$RUN/val.json" "${OUT:-$RUN/out}/"
    echo "reference model done"
else
    tail -n 3 "$RUN/log.jsonl" 2>/dev/null || true
fi
