"""Models the toolkit did not train, end to end through the CLI: an MLP on flat vectors brought with ``--model
file.py:NAME``, and a custom LightningModule following the VRG protocol trained with ``VRGProfiler``; each goes
``vrg profile`` -> ``vrg tune`` -> ``vrg sample`` -> ``vrg export`` / ``vrg inspect --json`` with its own ``--features
SPEC`` and ``--reference FILE.pt``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from vrg_lightning.checkpoint import read_vrg
from vrg_lightning.cli import main
from vrg_lightning.sampling import load_samples

MLP = '''
import torch
from torch import nn

class MLP(nn.Module):
    def __init__(self, dim=4, hidden=16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 1, hidden), nn.SiLU(), nn.Linear(hidden, dim))
    def forward(self, x, t):
        return self.net(torch.cat([x, (t / 1000.0)[:, None]], 1))

def make():
    torch.manual_seed(0)
    return MLP()

def project():
    """Features of my own for 4-d vectors (and for flattened 1x2x2 images): a fixed projection to 3 numbers."""
    torch.manual_seed(1)
    lin = nn.Linear(4, 3)
    return nn.Sequential(nn.Flatten(), lin)
'''

LIT = '''
import lightning.pytorch as pl
import torch
from torch import nn
from vrg_lightning.schedule import NoiseSchedule, add_noise

class Eps(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(5, hidden), nn.SiLU(), nn.Linear(hidden, 4))
    def forward(self, x, alpha_bar, class_labels=None):
        h = torch.cat([x.flatten(1), alpha_bar.to(x.dtype)[:, None]], 1)
        return self.net(h).view_as(x)

class LitImages(pl.LightningModule):
    """Tiny 1x2x2 "images"; follows the VRG protocol (vrg_schedule, vrg_denoiser, training_step fields)."""
    vrg_sample_shape = (1, 2, 2)

    def __init__(self, hidden: int = 16, lr: float = 1e-2):
        super().__init__()
        self.save_hyperparameters()
        self.vrg_schedule = NoiseSchedule("squaredcos_cap_v2")
        self.eps = Eps(hidden)

    def vrg_denoiser(self):
        return self.eps

    def training_step(self, batch, batch_idx):
        (x0,) = batch
        ab = self.vrg_schedule.alphas_cumprod[torch.randint(0, 1000, (x0.shape[0],))]
        noise = torch.randn_like(x0)
        xt, _, _ = add_noise(x0, noise, ab)
        err = self.eps(xt, ab) - noise
        return {"loss": (err ** 2).mean(), "vrg_alpha_bar": ab, "vrg_error": err.detach()}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
'''

TUNE = ["--solvers", "ddim", "--steps", "3", "--bases", "time_uniform", "--lps", "0.1", "--objectives", "paper",
        "--num-samples", "16", "--seeds", "0", "--confirm-seeds", "1,2", "--no-fix", "--batch-size", "16"]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("any_model")
    (d / "mlp.py").write_text(MLP)
    (d / "vrg_test_lit_images.py").write_text(LIT)
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.5, -0.5, 0.5, -0.5], [-0.5, 0.5, -0.5, 0.5]])
    data = centers[torch.randint(2, (256,), generator=g)] + 0.1 * torch.randn(256, 4, generator=g)
    torch.save(data[:192], d / "data.pt")
    torch.save(data[192:], d / "ref.pt")
    torch.save(data[:192].view(-1, 1, 2, 2), d / "images.pt")
    torch.save(data[192:].view(-1, 1, 2, 2), d / "ref_images.pt")
    return d


def _json(capsys: pytest.CaptureFixture) -> object:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _sample_export_inspect(work: Path, ckpt: Path, extra: list[str], features: str, reference: str,
                           shape: tuple[int, ...], capsys: pytest.CaptureFixture) -> dict:
    """``vrg sample`` of the tuned entry, ``vrg export`` of it and ``vrg inspect --json``; returns the entry."""
    out = work / f"samples-{ckpt.stem}"
    assert main(["sample", "--ckpt", str(ckpt), *extra, "--solver", "ddim", "--steps", "3", "--trajectory", "vrg",
                 "--num-samples", "32", "--shard-size", "32", "--out", str(out), "--reference", reference,
                 "--features", features, "--cache-dir", str(work / "cache"), "--accelerator", "cpu",
                 "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    x = load_samples(out)
    assert x.shape == (32, *shape) and torch.isfinite(x).all()
    assert report["fid"]["metric"] == f"FID[{features}]" and report["fid_reference"]["features"] == features
    capsys.readouterr()
    assert main(["inspect", str(ckpt), "--json"]) == 0
    info = _json(capsys)
    (entry,) = info["entries"]
    assert {"solver", "steps", "base", "alpha_bar", "base_alpha_bar", "objective", "lp", "validated"} <= set(entry)
    assert report["trajectory"]["alpha_bar"] == entry["alpha_bar"]  # vrg sample sampled the stored entry
    assert main(["export", "--ckpt", str(ckpt), "--solver", "ddim", "--steps", "3", "--format", "sigmas",
                 "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    ab = torch.tensor(entry["alpha_bar"], dtype=torch.float64)
    sigmas = ((1 - ab) / ab).sqrt().flip(0)  # noisiest first, then the clean end point
    torch.testing.assert_close(torch.tensor(exported["values"][:3], dtype=torch.float64), sigmas, rtol=1e-6, atol=0)
    return entry


def test_an_mlp_on_flat_vectors_goes_end_to_end(work: Path, capsys: pytest.CaptureFixture) -> None:
    spec, feats = f"{work / 'mlp.py'}:make", f"{work / 'mlp.py'}:project"
    prof, tuned = work / "mlp_profile.pt", work / "mlp_tuned.pt"
    assert main(["profile", "--model", spec, "--schedule", "linear", "--prediction-type", "epsilon", "--data",
                 str(work / "data.pt"), "--out", str(prof), "--samples", "128", "--bins", "8", "--steps", "3",
                 "--solvers", "ddim", "--bases", "time_uniform", "--device", "cpu", "--json"]) == 0
    info = _json(capsys)
    raw = torch.load(prof, weights_only=True)  # plain data: no weights, no code
    assert "state_dict" not in raw and raw["vrg"]["model"] == {"spec": spec, "sample_shape": [4],
                                                               "prediction_type": "epsilon", "num_classes": None}
    assert info["schedule"]["beta_schedule"] == "linear" and len(info["entries"]) == 1
    assert main(["tune", "--ckpt", str(prof), "--out", str(tuned), *TUNE]) == 2  # the file needs its SPEC
    assert f"records the model SPEC '{spec}'" in (err := capsys.readouterr().err) and f"--model '{spec}'" in err
    assert main(["tune", "--ckpt", str(prof), "--model", spec, "--out", str(tuned), "--features", feats,
                 "--reference", str(work / "ref.pt"), "--cache-dir", str(work / "cache"), *TUNE, "--json"]) == 0
    (record,) = _json(capsys)
    assert record["validated"]["features"] == feats and isinstance(record["validated"]["selected"], bool)
    vrg = read_vrg(tuned)
    assert vrg["tune"]["settings"]["features"] == feats and vrg["tune"]["reference"] == str(work / "ref.pt")
    entry = _sample_export_inspect(work, tuned, ["--model", spec], feats, str(work / "ref.pt"), (4,), capsys)
    assert entry["validated"]["selected"] == record["validated"]["selected"]


def test_a_protocol_lightning_module_goes_end_to_end(work: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from vrg_lightning import VRGProfiler

    monkeypatch.syspath_prepend(str(work))
    from vrg_test_lit_images import LitImages

    torch.manual_seed(0)
    data = torch.load(work / "images.pt")
    cb = VRGProfiler(num_bins=8, steps=(3,), solvers=("ddim",), bases=("time_uniform",), probe_at_fit_end=False,
                     half_life_samples=None)
    trainer = pl.Trainer(max_steps=12, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb], accelerator="cpu")
    trainer.fit(LitImages(), DataLoader(TensorDataset(data), batch_size=32, shuffle=True))
    ckpt, prof, tuned = work / "lit.ckpt", work / "lit_profile.ckpt", work / "lit_tuned.ckpt"
    trainer.save_checkpoint(ckpt)
    feats, ref = f"{work / 'mlp.py'}:project", str(work / "ref_images.pt")
    # the training checkpoint itself, its class given as a SPEC: tune its free-mode trajectories
    assert main(["tune", "--ckpt", str(ckpt), "--model", "vrg_test_lit_images:LitImages", "--out",
                 str(work / "lit_tuned_free.ckpt"), "--features", feats, "--reference", ref, *TUNE]) == 0
    # profile it post hoc: the new file records the class path, so the later commands need nothing else
    assert main(["profile", "--ckpt", str(ckpt), "--model", "vrg_test_lit_images:LitImages", "--data",
                 str(work / "images.pt"), "--out", str(prof), "--samples", "128", "--bins", "8", "--steps", "3",
                 "--solvers", "ddim", "--bases", "time_uniform", "--device", "cpu"]) == 0
    raw = torch.load(prof, weights_only=True)
    assert raw["vrg"]["module"] == {"class_path": "vrg_test_lit_images:LitImages", "sample_shape": [1, 2, 2]}
    assert raw["hyper_parameters"]["hidden"] == 16 and set(raw["state_dict"]) == set(torch.load(
        ckpt, weights_only=True)["state_dict"])
    assert raw["vrg"]["schedule"]["beta_schedule"] == "squaredcos_cap_v2"
    assert main(["tune", "--ckpt", str(prof), "--out", str(tuned), "--features", feats, "--reference", ref,
                 "--cache-dir", str(work / "cache"), *TUNE]) == 0
    capsys.readouterr()
    _sample_export_inspect(work, tuned, [], feats, ref, (1, 2, 2), capsys)
    assert "vrg_test_lit_images" in sys.modules
