#!/usr/bin/env bash
# Rebuild the offline world from scratch with the same commands a researcher runs on ImageNet:
# benchmark -> tiny CLIP -> concepts/phrases -> OTI -> phi -> gallery index -> evaluation.
# Times measured on 2 CPU cores are in the README ("The offline world").
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
M=(--model isearle-shapes --pretrained isearle-shapes)
RUN=${RUN:-runs}

isearle build-shapes --out assets/shapescir --seed 0
isearle train-clip --out-dir "$RUN/clip" --resume --export assets/models/isearle-shapes.safetensors
isearle phrases --vocabulary shapes --generator offline --samples 32 --out "$RUN/phrases.json"
isearle oti "${M[@]}" --shapes 1024 --shapes-seed 7000 --vocabulary shapes --phrases "$RUN/phrases.json" \
  --batch-size 256 --out "$RUN/oti"
isearle train-phi "${M[@]}" --oti "$RUN/oti" --phrases "$RUN/phrases.json" --epochs 100 \
  --out assets/models/isearle-shapes-phi.safetensors
for m in image text image+text oti phi; do
  isearle eval "${M[@]}" --benchmark shapes --split test --method "$m" --json "$RUN/eval_${m/+/_}.json"
done
python -m isearle.demo build-gallery     # the demo's gallery_index/ from ShapesCIR and the tiny CLIP
python -m isearle.demo make-examples     # assets/examples.json from the val split
