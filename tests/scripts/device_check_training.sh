#!/usr/bin/env bash
# GPU checks of the training side (run from the repo root on a CUDA machine; diffusers and jsonargparse carried as
# wheels in .whl/ and .whl_train/): the digits default trained on the GPU (wall time, sample grids of base and VRG
# trajectories, vrg inspect), and benchmarks/profiling_overhead.py on the GPU (digits UNet and the CIFAR-10 DDPM UNet).
set -uo pipefail
export PYTHONUNBUFFERED=1
REPO=$PWD
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  .whl_train/*.whl || exit 1
export PYTHONPATH=/tmp/site:$REPO
python3 -c "import torch, diffusers, lightning, jsonargparse; print(torch.__version__, torch.cuda.get_device_name(), diffusers.__version__, lightning.__version__, jsonargparse.__version__)"

mkdir -p /tmp/run && cd /tmp/run
start=$SECONDS
python3 "$REPO/train.py" fit --config "$REPO/configs/digits.yaml" --trainer.enable_progress_bar false > "$OUT/train_log.txt" 2>&1
echo "train exit $? wall $((SECONDS - start)) s" | tee -a "$OUT/train_log.txt"
python3 -m vrg_lightning.cli inspect runs/digits/checkpoints/last.ckpt | tee "$OUT/inspect.txt"
cp runs/digits/checkpoints/last.ckpt "$OUT/digits_last.ckpt"
python3 - "$OUT/grids.png" <<'PY'
import sys, torch
from PIL import Image
from vrg_lightning.checkpoint import find_entry, load_denoiser
from vrg_lightning.module import image_grid
from vrg_lightning.solvers import sample
from vrg_lightning.trajectories import make_trajectory
den, vrg = load_denoiser("runs/digits/checkpoints/last.ckpt")
den = den.cuda()
x = torch.randn(100, 1, 16, 16, generator=torch.Generator().manual_seed(0)).cuda()
panels = [("ddim100", make_trajectory(den.schedule, "time_uniform", 100))]
for base in ("time_uniform", "logSNR"):
    e = find_entry(vrg, "ddim", 10, base=base)
    panels += [(f"{base}10", torch.tensor(e["base_alpha_bar"], dtype=torch.float64)),
               (f"{base}10_vrg", torch.tensor(e["alpha_bar"], dtype=torch.float64))]
grids = []
with torch.no_grad():
    for name, ab in panels:
        out = sample("ddim", den.eps_fn(), x, ab.cuda())
        grids.append(image_grid((out.clamp(-1, 1).cpu() + 1) / 2, nrow=10, pad=2))
        print(name, "mean", float(out.mean()), "std", float(out.std()))
g = torch.cat([torch.cat([gr, torch.ones(1, gr.shape[1], 6)], 2) for gr in grids], 2)
Image.fromarray((g[0].numpy() * 255).round().astype("uint8")).resize((g.shape[2] * 3, g.shape[1] * 3), 0).save(sys.argv[1])
print("panels:", [p[0] for p in panels])
PY
cd "$REPO"
python3 benchmarks/profiling_overhead.py --steps 600 --warmup 50 --block 10 2>/dev/null | tail -1 | tee "$OUT/overhead_digits.json"
python3 benchmarks/profiling_overhead.py --model cifar10 --steps 240 --warmup 30 --block 10 2>/dev/null | tail -1 | tee "$OUT/overhead_cifar.json"
