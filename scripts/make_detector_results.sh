#!/usr/bin/env bash
# Issue 4's figures on this CPU: the lung localizer fitted on every annotated image, lung boxes for the
# whole manifest, and the SSD300-VGG16 CPU configuration trained and tested on the grouped split and on
# the study's `paper` split. CPU, 2 threads: about 10 min for the localizer, 30-35 min per detector run.
# Stages already done are skipped (a finished run directory is not retrained).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:-../shared/data/cxr}
RES=docs/results/ssd300
mkdir -p "$RES" runs
if [ ! -f runs/localizer/model.safetensors ]; then
  cxrscreen localize fit --data "$DATA" --out runs/localizer --epochs 20 --budget-minutes 4
fi
cp runs/localizer/config.json "$RES/localizer_config.json"
if [ ! -f "$RES/lung_boxes.csv" ]; then
  cxrscreen localize label --data "$DATA" --localizer runs/localizer --out "$RES/lung_boxes.csv"
fi
for protocol in grouped paper; do
  SPLIT=configs/splits/cxr_${protocol}_seed0.csv
  RUN=runs/ssd300_cpu_$protocol
  mkdir -p "$RUN" "$RES/$protocol"
  cp "$RES/lung_boxes.csv" "$RUN/boxes.csv"
  CMD="cxrscreen train --config configs/ssd300_cpu.yaml --data $DATA --split $SPLIT --out $RUN"
  echo "$CMD" > "$RES/$protocol/command.txt"
  $CMD 2>&1 | tee "$RES/$protocol/train.log"
  cxrscreen evaluate --model "$RUN" --data "$DATA" --split "$SPLIT" --subset test --out "$RES/$protocol/eval_test.json"
  cp "$RUN/history.csv" "$RUN/config.json" "$RES/$protocol/"
done
python scripts/eval_table.py "$RES"/grouped/eval_test.json "$RES"/paper/eval_test.json --per-source
