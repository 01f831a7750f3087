#!/usr/bin/env bash
# The main job on the embedded default (scikit-learn digits), end to end:
#   set up the venv -> train (VRGProfiler records the error profile and stores VRG trajectories in the checkpoint)
#   -> inspect the checkpoint -> sample base vs VRG trajectories from the same noise -> print the FID table.
# Uses a GPU automatically when one is present. Re-running resumes finished sampling shards.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/setup_venv.sh
RUN="${RUN:-runs/digits}"
CKPT="$RUN/checkpoints/last.ckpt"
if [ ! -f "$CKPT" ]; then
  python train.py fit --config configs/digits.yaml
fi
vrg inspect "$CKPT"
vrg sample --ckpt "$CKPT" --compare --solver ddim,dpmpp_2m --steps 10,20 \
  --num-samples "${NUM_SAMPLES:-2000}" --seeds 0,1,2 --reference digits --out "$RUN/compare"
