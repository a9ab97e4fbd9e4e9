#!/usr/bin/env bash
# The study's detector on this CPU (issue #14), both splits (grouped and the study's `paper` split):
#  1. the lung localizer fitted on every annotated image and lung boxes for the whole manifest (issue 4;
#     the boxes file is committed: docs/results/ssd300/lung_boxes.csv);
#  2. ssdlite_efficientnet_lite0: the study's SSD with the ImageNet backbone this machine can get (offline
#     EfficientNet-Lite0 weights), configs/ssdlite_lite0_<split>_cpu.yaml, <= 60 min per split;
#  3. SSD300-VGG16, the study's literal architecture, from scratch (configs/ssd300_cpu.yaml; its ImageNet
#     VGG-16 weights cannot be had offline), kept for reference: SSD300=1 to rerun it.
# Each run is evaluated on its split's test subset (`cxrscreen evaluate`'s function and defaults) and its
# figures and plots are written with `python -m cxrscreen.experiments.report run`.
# Stages already done are skipped (a finished run directory is not retrained).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cxr}
BOXES=docs/results/ssd300/lung_boxes.csv
mkdir -p runs
if [ ! -f "$BOXES" ]; then
  if [ ! -f runs/localizer/model.safetensors ]; then
    cxrscreen localize fit --data "$DATA" --out runs/localizer --epochs 20 --budget-minutes 4
  fi
  cp runs/localizer/config.json docs/results/ssd300/localizer_config.json
  cxrscreen localize label --data "$DATA" --localizer runs/localizer --out "$BOXES"
fi
for protocol in grouped paper; do
  SPLIT=configs/splits/cxr_${protocol}_seed0.csv
  RUN=runs/ssdlite_lite0_$protocol
  RES=docs/results/study/detector/$protocol
  mkdir -p "$RES"
  CMD="cxrscreen train --config configs/ssdlite_lite0_${protocol}_cpu.yaml --data $DATA --split $SPLIT --out $RUN"
  echo "$CMD" > "$RES/command.txt"
  if ! grep -q '"finished": true' "$RUN/config.json" 2>/dev/null; then
    $CMD 2>&1 | tee "$RES/train.log"
  fi
  python -m cxrscreen.experiments.report run "$RUN" --data "$DATA" --split "$SPLIT" --out "$RES"
  if [ "${SSD300:-0}" = 1 ]; then
    OLD=docs/results/ssd300/$protocol
    mkdir -p "$OLD" "runs/ssd300_cpu_$protocol"
    cp "$BOXES" "runs/ssd300_cpu_$protocol/boxes.csv"
    cxrscreen train --config configs/ssd300_cpu.yaml --data "$DATA" --split "$SPLIT" --out "runs/ssd300_cpu_$protocol"
    cxrscreen evaluate --model "runs/ssd300_cpu_$protocol" --data "$DATA" --split "$SPLIT" --subset test \
      --out "$OLD/eval_test.json"
  fi
done
python scripts/eval_table.py docs/results/study/detector/grouped/eval_test.json \
  docs/results/study/detector/paper/eval_test.json --per-source
