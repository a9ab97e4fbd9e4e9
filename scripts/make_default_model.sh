#!/usr/bin/env bash
# Rebuild the bundled default model and every figure of its model card, from ../shared/data/cxr.
# CPU, 2 threads: about 30 min of training, a few minutes of evaluation, about 20 min of audit.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cxr}
SPLIT=configs/splits/cxr_grouped_seed0.csv
RUN=${RUN:-runs/default}
RES=docs/results/default_model
mkdir -p "$RES"
TRAIN_CMD="cxrscreen train --config configs/default_model.yaml --data $DATA --split $SPLIT --out $RUN"
echo "$TRAIN_CMD" > "$RES/command.txt"
$TRAIN_CMD
cxrscreen calibrate --model "$RUN" --data "$DATA" --split "$SPLIT"
cxrscreen evaluate --model "$RUN" --data "$DATA" --split "$SPLIT" --subset test --out "$RES/eval_test.json"
cxrscreen evaluate --model "$RUN" --data "$DATA" --split "$SPLIT" --subset test --argmax \
  --out "$RES/eval_test_argmax.json"
cp "$RUN/history.csv" "$RUN/config.json" "$RUN/eval/calibration.json" "$RUN/eval/reliability.png" "$RES/"
cxrscreen audit --model "$RUN" --data "$DATA" --split "$SPLIT" --out docs/results/audit --budget-minutes "${AUDIT_MINUTES:-3}"
python benchmarks/gate_ood.py > docs/results/gate_ood.json
python scripts/bundle_model.py --run "$RUN" --eval "$RES/eval_test.json" --eval-argmax "$RES/eval_test_argmax.json" \
  --audit docs/results/audit/audit.json --gate docs/results/gate_ood.json --command "$TRAIN_CMD"
python benchmarks/inference.py > docs/results/inference.json
