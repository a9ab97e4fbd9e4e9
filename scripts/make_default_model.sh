#!/usr/bin/env bash
# Rebuild the bundled default model (v3: frozen multi-stage ImageNet features + a linear head) and every figure of
# its model card, from ../shared/data/cxr and ../shared/data/siim; the recipe is chosen by `cxrscreen select` on
# the external selection set ../shared/data/external (never fitted on) and leave-one-source-out.
# CPU, 2 threads: feature extraction of the ~7,700 images once (cached under ~/.cache/cxrscreen/features; 20-40 min
# on a shared 2-core CPU, about 4 min alone), then seconds per head; evaluation of the bundled weights a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
CXR=${CXR:-../shared/data/cxr}
SIIM=${SIIM:-../shared/data/siim}
EXT=${EXT:-../shared/data/external}
DATA=data/merged
SPLIT=configs/splits/merged_grouped_seed0.csv
RUN=${RUN:-runs/default}
RES=docs/results/default_model
W=src/cxrscreen/weights
mkdir -p "$RES"
# the merge and its split: every cxr image keeps its subset of the cxr split, siim has its own grouped split
cxrscreen data build --source "manifest:$CXR" --source "manifest:$SIIM" --out "$DATA" > /dev/null
cxrscreen data split "$SIIM" --protocol grouped --seed 0 --out configs/splits/siim_grouped_seed0.csv
cxrscreen data split "$DATA" --protocol combine --part "configs/splits/cxr_grouped_seed0.csv=$CXR" \
  --part "configs/splits/siim_grouped_seed0.csv=$SIIM" --out "$SPLIT"
# choose the recipe: cxr and siim grouped tests, the external set, leave-one-source-out (docs/results/select/)
cxrscreen select --config configs/select.yaml --out docs/results/select
# fit the shipped recipe's head on the merged train images (grouped CV for C), calibrate on val
TRAIN_CMD="cxrscreen fit-head --config configs/default_model_head.yaml --data $DATA --split $SPLIT --out $RUN"
echo "$TRAIN_CMD" > "$RES/command.txt"
$TRAIN_CMD
cp "$RUN/config.json" "$RUN/eval/calibration.json" "$RUN/eval/reliability.png" "$RES/"
# bundle the float16 weights (and their ONNX export), then measure the weights exactly as they ship
python scripts/bundle_model.py --run "$RUN" --onnx --command "$TRAIN_CMD"
# (the bundled model: no --model) the shipped rule on the cxr and siim grouped tests and the external set
cxrscreen evaluate --data "$CXR" --split configs/splits/cxr_grouped_seed0.csv --subset test \
  --out "$RES/eval_cxr_test.json"
cxrscreen evaluate --data "$EXT" --out "$RES/eval_external.json"
cxrscreen evaluate --data "$SIIM" --split configs/splits/siim_grouped_seed0.csv --subset test \
  --out "$RES/eval_siim_test.json"
python scripts/bundle_model.py --run "$RUN" --onnx --command "$TRAIN_CMD" --eval "$RES/eval_cxr_test.json" \
  --eval-siim "$RES/eval_siim_test.json" --eval-external "$RES/eval_external.json" \
  --select docs/results/select/select.json --candidate "$(python -c "import yaml; print(yaml.safe_load(open('configs/default_model_head.yaml'))['candidate'])")" \
  --gate docs/results/gate_ood.json
# site adaptation: siim as the new hospital
python scripts/adapt_curve.py --out docs/results/adapt
python benchmarks/inference.py > docs/results/inference.json
