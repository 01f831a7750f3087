"""A 2-process CPU DDP fit (gloo) gives the same error profile as 1 process over the same (image, t, noise) sets,
identical on both ranks, for free mode and the fit-end probe. Runs tests/scripts/ddp_profile.py as subprocesses
(Lightning's DDP relaunches the script's own command line, so it cannot run inside pytest)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "scripts" / "ddp_profile.py"
SUMS = ("count", "lam_sum", "n", "s1", "s2", "s3", "s4")


@pytest.mark.slow
def test_ddp_profile_equals_single_process(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = {n: subprocess.Popen([sys.executable, str(SCRIPT), "--devices", str(n), "--out", str(tmp_path / f"d{n}")],
                                 cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (1, 2)}
    for n, p in procs.items():
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"{n}-process run failed:\n{out[-3000:]}"
    one = torch.load(tmp_path / "d1" / "rank0.pt", weights_only=True)
    r0, r1 = (torch.load(tmp_path / "d2" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == 2 and one["world"] == 1 and r0["step"] == one["step"] == 4
    for mode in ("free", "probe"):
        assert float(one[mode]["count"].sum()) > 0
        for k in SUMS:
            assert torch.equal(r0[mode][k], r1[mode][k]), f"{mode}.{k} differs between ranks"
            torch.testing.assert_close(r0[mode][k], one[mode][k], rtol=1e-5, atol=1e-9, msg=f"{mode}.{k}")
    assert float(one["probe"]["count"].sum()) == 256
