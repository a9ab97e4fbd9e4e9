#!/usr/bin/env bash
# Rebuild the bundled default model and every figure of its model card, from ../shared/data/cxr and
# ../shared/data/siim. CPU, 2 threads: about 50 min of training, a few minutes of evaluation, about 45 min
# of audit (AUDIT_MINUTES per trained model).
set -euo pipefail
cd "$(dirname "$0")/.."
CXR=${CXR:-../shared/data/cxr}
SIIM=${SIIM:-../shared/data/siim}
DATA=data/merged
SPLIT=configs/splits/merged_grouped_seed0.csv
RUN=${RUN:-runs/default}
RES=docs/results/default_model
mkdir -p "$RES"
# the merge and its split: every cxr image keeps its subset of the cxr split, siim has its own grouped split
cxrscreen data build --source "manifest:$CXR" --source "manifest:$SIIM" --out "$DATA" > /dev/null
cxrscreen data split "$SIIM" --protocol grouped --seed 0 --out configs/splits/siim_grouped_seed0.csv
cxrscreen data split "$DATA" --protocol combine --part "configs/splits/cxr_grouped_seed0.csv=$CXR" \
  --part "configs/splits/siim_grouped_seed0.csv=$SIIM" --out "$SPLIT"
python scripts/frozen_probe.py --data "$DATA" --split "$SPLIT" --out docs/results/data_choice/frozen_probe.json \
  > /dev/null
TRAIN_CMD="cxrscreen train --config configs/default_model.yaml --data $DATA --split $SPLIT --out $RUN"
echo "$TRAIN_CMD" > "$RES/command.txt"
$TRAIN_CMD
# temperature, the COVID operating point (sensitivity 0.95 on val), and the shipped rule: arg-max or that point,
# whichever has the higher worst per-source COVID sensitivity / specificity on val
cxrscreen calibrate --model "$RUN" --data "$DATA" --split "$SPLIT"
THR=$(python -c "import json; print(json.load(open('$RUN/config.json'))['operating_point']['threshold'])")
# the internal tests: cxr (the study's kind of data) and siim (same hospitals for both classes), under the
# shipped rule and under the operating point
for PART in cxr siim; do
  D=$CXR; [ "$PART" = siim ] && D=$SIIM
  cxrscreen evaluate --model "$RUN" --data "$D" --split "configs/splits/${PART}_grouped_seed0.csv" --subset test \
    --out "$RES/eval_${PART}_test.json"
  cxrscreen evaluate --model "$RUN" --data "$D" --split "configs/splits/${PART}_grouped_seed0.csv" --subset test \
    --threshold "$THR" --out "$RES/eval_${PART}_test_op.json"
done
cp "$RUN/history.csv" "$RUN/config.json" "$RUN/eval/calibration.json" "$RUN/eval/reliability.png" "$RES/"
cxrscreen audit --model "$RUN" --data "$DATA" --split "$SPLIT" --out docs/results/audit \
  --lung-boxes "$CXR/annotations/lung_boxes.coco.json" --parts per_source,masking,loso \
  --budget-minutes "${AUDIT_MINUTES:-4}" --epochs 3
python benchmarks/gate_ood.py > docs/results/gate_ood.json
python scripts/bundle_model.py --run "$RUN" --eval "$RES/eval_cxr_test.json" --eval-op "$RES/eval_cxr_test_op.json" \
  --eval-siim "$RES/eval_siim_test.json" --eval-siim-op "$RES/eval_siim_test_op.json" --probe docs/results/data_choice/frozen_probe.json \
  --audit docs/results/audit/audit.json --gate docs/results/gate_ood.json --command "$TRAIN_CMD"
python benchmarks/inference.py > docs/results/inference.json
