#!/usr/bin/env bash
# GPU checks (run on a CUDA machine from the repo root; diffusers and its extra needs carried as wheels in .whl/):
# vrg sample (auto and ddp_spawn) and --compare on the GPU, CPU-vs-device trajectories in every solver, and benchmarks/sampling.py.
set -euo pipefail
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -c "import torch, diffusers, lightning, torchmetrics; print(torch.__version__, torch.cuda.get_device_name(), diffusers.__version__, lightning.__version__, torchmetrics.__version__)"
python3 tests/helpers.py /tmp/fx
python3 sample.py --ckpt /tmp/fx/model.ckpt --trajectory vrg --base logSNR --steps 4 --num-samples 96 --shard-size 32 \
  --out /tmp/fx/out --reference /tmp/fx/reference.pt --cache-dir /tmp/fx/cache --accelerator gpu --devices 1 --no-progress
python3 sample.py --ckpt /tmp/fx/model.ckpt --compare --trajectory time_uniform --steps 4 --seeds 0,1 --num-samples 32 \
  --out /tmp/fx/cmp --reference /tmp/fx/reference.pt --cache-dir /tmp/fx/cache --accelerator gpu --no-progress
python3 sample.py --ckpt /tmp/fx/model.ckpt --trajectory vrg --base logSNR --steps 4 --num-samples 96 --shard-size 32 \
  --out /tmp/fx/spawn --reference /tmp/fx/reference.pt --cache-dir /tmp/fx/cache --accelerator gpu --devices 1 \
  --strategy ddp_spawn --no-progress
python3 -c "import json; a, b = (json.load(open(f'/tmp/fx/{d}/report.json'))['fid']['value'] for d in ('out', 'spawn')); print('FID auto vs ddp_spawn on the GPU:', a, b)"
cp /tmp/fx/out/report.json "$OUT/gpu_report.json"
python3 - <<'PY'
import torch
from vrg_lightning.checkpoint import load_denoiser
from vrg_lightning.sampling import load_samples, generate
from vrg_lightning.solvers import SOLVERS, sample
from vrg_lightning.trajectories import make_trajectory
den, vrg = load_denoiser("/tmp/fx/model.ckpt")
ab = torch.tensor(vrg["entries"][1]["alpha_bar"], dtype=torch.float64)
cpu = generate(den, ab, "ddim", 96, 0, batch_size=96)
gpu = load_samples("/tmp/fx/out")
print("GPU job vs CPU generate: max abs diff", float((cpu - gpu).abs().max()), "mean", float((cpu - gpu).abs().mean()))
den = den.cuda().double()
x = torch.randn(8, 1, 16, 16, dtype=torch.float64, device="cuda")
tr = make_trajectory(den.schedule, "logSNR", 12)
for s in SOLVERS:
    a = sample(s, den.eps_fn(), x, tr.cuda())
    b = sample(s, den.eps_fn(), x, tr)
    print(f"{s}: trajectory on CPU vs on GPU, max abs diff {float((a - b).abs().max()):.3g}")
PY
python3 benchmarks/sampling.py --device cuda --unet digits --batch 256 --steps 10 --repeats 7 --json "$OUT/bench_digits.json" | tail -5
python3 benchmarks/sampling.py --device cuda --unet cifar --batch 128 --steps 10 --repeats 7 --json "$OUT/bench_cifar.json" | tail -5
