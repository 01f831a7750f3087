#!/usr/bin/env bash
# The main job on the embedded default (scikit-learn digits), end to end:
#   set up the venv -> train (VRGProfiler records the error profile, stores VRG trajectories in the checkpoint and,
#   at fit end, validates each one by paired FID: it stays only if it beat its base on fresh seeds)
#   -> inspect the checkpoint -> sample base vs VRG trajectories from the same noise -> print the FID table.
# Uses a GPU automatically when one is present. Re-running resumes finished sampling shards.
# Knobs (environment): TRAIN_ARGS (extra LightningCLI flags, e.g. "--trainer.max_steps 300"),
# NUM_SAMPLES (images per seed and trajectory in the comparison, default 500).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/setup_venv.sh
RUN=runs/digits  # the folder configs/digits.yaml writes to
CKPT="$RUN/checkpoints/last.ckpt"
if [ ! -f "$CKPT" ]; then
  # shellcheck disable=SC2086
  python train.py fit --config configs/digits.yaml ${TRAIN_ARGS:-}
fi
vrg inspect "$CKPT"
vrg sample --ckpt "$CKPT" --compare --solver ddim,dpmpp_2m --steps 10 \
  --num-samples "${NUM_SAMPLES:-500}" --seeds 0,1,2 --reference digits --out "$RUN/compare"
