#!/usr/bin/env bash
# Create (or reuse) the project venv outside the clone and install vrg-lightning with its extras.
# Usage: . scripts/setup_venv.sh   (sourced: leaves the venv activated)
VENV="${VRG_VENV:-$HOME/.cache/vrg-venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# Pinned for this machine: torch 2.14.1 + torchvision 0.29.1 lie on local disk and work with torch-fidelity
# (InceptionV3 FID). On your own machine, install the torch build for your CUDA first; pyproject.toml does not pin it.
python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q --disable-pip-version-check -e ".[dev,inception,sd]"
