"""Any model: the denoiser protocol's ε conversion and continuous timesteps, SPECs, the adapters (model(x, t), protocol
LightningModule, diffusers folders), load_model, features SPECs, sample files, and every bad-input error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import TINY_UNET

from vrg_lightning.checkpoint import build_vrg_state, load_denoiser
from vrg_lightning.cli import main
from vrg_lightning.data import load_dataset
from vrg_lightning.evaluation import build_features
from vrg_lightning.models import (
    ModelSpecRequired,
    ModuleDenoiser,
    ProtocolDenoiser,
    load_diffusers_dir,
    load_lightning_module,
    load_model,
    module_section,
    schedule_from,
    to_epsilon,
)
from vrg_lightning.probe import probe_profile
from vrg_lightning.profile import ErrorProfile
from vrg_lightning.sampling import generate
from vrg_lightning.schedule import NoiseSchedule

SCHED = NoiseSchedule()

NETS = '''
import torch
from torch import nn

class Oracle(nn.Module):
    """Knows x0 = 0.5 * ones: returns the exact eps, v or x0 of the input, reading alpha_bar back from t."""
    def __init__(self, target="epsilon"):
        super().__init__()
        self.target, self.seen = target, []
        self.scale = nn.Parameter(torch.ones(()))
    def forward(self, x, t):
        from vrg_lightning.schedule import NoiseSchedule
        self.seen.append(t)
        ab = NoiseSchedule().t_to_alpha_bar(t.double()).reshape(-1, *[1] * (x.ndim - 1))
        x0 = torch.full_like(x, 0.5).double()
        eps = (x.double() - ab.sqrt() * x0) / (1 - ab).sqrt()
        out = {"epsilon": eps, "v_prediction": ab.sqrt() * eps - (1 - ab).sqrt() * x0, "sample": x0}[self.target]
        return (out * self.scale).to(x.dtype)

class Sample:
    def __init__(self, sample):
        self.sample = sample

class Wrapped(nn.Module):
    def forward(self, x, t):
        return Sample(torch.zeros_like(x))

def v_oracle():
    return Oracle("v_prediction")

class WrongShape(nn.Module):
    def forward(self, x, t):
        return x[:, :3]

class IntOut(nn.Module):
    def forward(self, x, t):
        return torch.zeros_like(x, dtype=torch.long)

class NaNOut(nn.Module):
    def forward(self, x, t):
        return torch.full_like(x, float("nan"))

def not_a_module():
    return 42

def project():
    torch.manual_seed(1)
    return nn.Linear(4, 3)

def bad_features():
    return nn.Identity()
'''

LIT = '''
import lightning.pytorch as pl
import torch
from torch import nn
from vrg_lightning.schedule import NoiseSchedule

class Eps(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim + 1, dim)
    def forward(self, x, alpha_bar, class_labels=None):
        return self.lin(torch.cat([x, alpha_bar.to(x.dtype)[:, None]], 1))

class Lit(pl.LightningModule):
    def __init__(self, dim: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.vrg_schedule = NoiseSchedule("squaredcos_cap_v2")
        self.net = Eps(dim)
    def vrg_denoiser(self):
        return self.net

class NoProtocol(pl.LightningModule):
    def __init__(self, dim: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(dim, dim)
'''


@pytest.fixture()
def nets(tmp_path: Path) -> Path:
    (tmp_path / "nets.py").write_text(NETS)
    return tmp_path / "nets.py"


def _exact(target: str, shape=(3, 2, 2)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x0 = torch.full(shape, 0.5, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    ab = torch.tensor([0.97, 0.4, 0.003], dtype=torch.float64)
    a = ab.view(-1, *[1] * (len(shape) - 1))
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    out = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[target]
    return xt, ab, out, eps


@pytest.mark.parametrize("target", ["epsilon", "v_prediction", "sample"])
def test_to_epsilon_recovers_the_noise_for_every_prediction_type(target: str) -> None:
    xt, ab, out, eps = _exact(target)
    torch.testing.assert_close(to_epsilon(out, xt, ab, target), eps, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="prediction_type must be one of epsilon, v_prediction, sample, flow; got"):
        to_epsilon(out, xt, ab, "x0")


@pytest.mark.parametrize("target", ["epsilon", "v_prediction", "sample"])
def test_a_spec_model_is_called_with_continuous_timesteps_and_read_by_prediction_type(nets: Path,
                                                                                     target: str) -> None:
    from vrg_lightning.models import build_module, import_spec

    net = build_module(import_spec(f"{nets}:Oracle"), "Oracle")
    net.target = target
    den = ModuleDenoiser(net.double(), SCHED, target, (2, 2))
    xt, ab, _, eps = _exact("epsilon")
    torch.testing.assert_close(den(xt, ab), eps, rtol=1e-9, atol=1e-9)
    # t: a float [B] tensor in x's dtype; integer t at the training levels, log ᾱ linear in between (17.5 here)
    mid = (SCHED.alphas_cumprod[17] * SCHED.alphas_cumprod[18]).sqrt()
    den(torch.zeros(2, 2, 2, dtype=torch.float64), torch.stack([SCHED.alphas_cumprod[640], mid]))
    t = net.seen[-1]
    assert t.shape == (2,) and t.dtype == torch.float64
    torch.testing.assert_close(t, torch.tensor([640.0, 17.5], dtype=torch.float64), rtol=0, atol=1e-9)
    den(torch.zeros(2, 2, 2, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64))  # 0-d ᾱ: t is [B]
    assert net.seen[-1].shape == (2,) and float(net.seen[-1][0]) == float(net.seen[-1][1])


def test_spec_errors_name_the_value_and_the_fix(nets: Path, tmp_path: Path) -> None:
    from vrg_lightning.models import build_module, import_spec

    with pytest.raises(FileNotFoundError, match="no such file 'nope/missing.py'"):
        import_spec("nope/missing.py:make")
    with pytest.raises(ValueError, match="no module named 'not_a_pkg_xyz.nets' \\(is it installed"):
        import_spec("not_a_pkg_xyz.nets:make")
    with pytest.raises(ValueError, match=r"has no 'mkae'; it defines .*Oracle.*v_oracle"):
        import_spec(f"{nets}:mkae")
    with pytest.raises(ValueError, match="must be path/to/file.py:NAME or package.module:NAME"):
        import_spec("nets.py")
    (tmp_path / "broken.py").write_text("def f(:\n")
    with pytest.raises(ValueError, match="importing .*broken.py' failed: SyntaxError"):
        import_spec(f"{tmp_path / 'broken.py'}:f")
    with pytest.raises(ValueError, match="returned a int, not an nn.Module"):
        build_module(import_spec(f"{nets}:not_a_module"), "nets.py:not_a_module")


def test_load_model_errors_for_bad_outputs_types_and_shapes(nets: Path) -> None:
    with pytest.raises(ValueError, match=r"returned shape \(2, 3\) for an input of shape \(2, 4\)"):
        load_model(model=f"{nets}:WrongShape", sample_shape=(4,))
    with pytest.raises(ValueError, match=r"failed on input of shape \(2, 4\) \(called as model\(x, t\).*TypeError"):
        load_model(model="torch.nn:Identity", sample_shape=(4,))  # Identity takes no t
    with pytest.raises(ValueError, match="returned dtype torch.int64; it must return a floating-point"):
        load_model(model=f"{nets}:IntOut", sample_shape=(4,))
    with pytest.raises(ValueError, match=r"returned non-finite values \(NaN or inf\)"):
        load_model(model=f"{nets}:NaNOut", sample_shape=(4,))
    with pytest.raises(ValueError, match="prediction_type must be one of epsilon, v_prediction, sample, flow; got 'x0"):
        load_model(model=f"{nets}:Oracle", sample_shape=(4,), prediction_type="x0")
    with pytest.raises(ValueError, match="needs sample_shape"):
        load_model(model=f"{nets}:Oracle")
    wrapped = load_model(model=f"{nets}:Wrapped", sample_shape=(3,)).denoiser  # `.sample` is read
    assert torch.equal(wrapped(torch.ones(2, 3), torch.tensor(0.5)), torch.zeros(2, 3))


def test_schedules_come_from_names_or_scheduler_configs(tmp_path: Path, nets: Path) -> None:
    cfg = tmp_path / "scheduler_config.json"
    cfg.write_text(json.dumps({"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
                               "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction"}))
    sched, pred = schedule_from(cfg)
    assert (sched.beta_schedule, sched.beta_start, pred) == ("scaled_linear", 0.00085, "v_prediction")
    den = load_model(model=f"{nets}:v_oracle", schedule=str(cfg), sample_shape=(4,)).denoiser
    assert den.prediction_type == "v_prediction" and den.schedule == sched  # the file's prediction type is used
    (tmp_path / "other.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 16}))
    with pytest.raises(ValueError, match="other.json' is not a diffusers scheduler config"):
        schedule_from(tmp_path / "other.json")
    with pytest.raises(ValueError, match="schedule must be a beta-schedule name .* got 'cosin' \\(no such file\\)"):
        schedule_from("cosin")


def _spec_profile_file(tmp_path: Path, spec: str) -> Path:
    prof = ErrorProfile.from_table(SCHED.alphas_cumprod[::100], torch.full((10,), 0.1, dtype=torch.float64))
    vrg = build_vrg_state(SCHED, prof, [], prediction_type="epsilon",
                          model={"spec": spec, "sample_shape": [4], "prediction_type": "epsilon", "num_classes": None})
    torch.save({"vrg": vrg}, tmp_path / "p.pt")
    return tmp_path / "p.pt"


def test_a_file_recording_a_spec_needs_it_and_gives_its_settings(tmp_path: Path, nets: Path, capsys) -> None:
    spec = f"{nets}:Oracle"
    path = _spec_profile_file(tmp_path, spec)
    with pytest.raises(ModelSpecRequired, match=f"records the model SPEC '{spec}'.*pass model='{spec}'") as info:
        load_model(path)
    assert info.value.spec == spec
    with pytest.raises(ModelSpecRequired):
        load_denoiser(path)
    loaded = load_model(path, model=spec)  # schedule, prediction type and sample shape come from the file
    assert loaded.kind == "spec" and loaded.denoiser.sample_shape == (4,) and loaded.vrg is not None
    assert loaded.sections["model"]["spec"] == spec and loaded.checkpoint == {"vrg": loaded.checkpoint["vrg"]}
    with pytest.raises(ValueError, match=r"sample_shape=\(5,\) does not match the \(4,\) the checkpoint was profiled"):
        load_model(path, model=spec, sample_shape=(5,))
    with pytest.raises(ValueError, match="made with noise schedule"):
        load_model(path, model=spec, schedule="squaredcos_cap_v2")
    rc = main(["sample", "--ckpt", str(path), "--trajectory", "logSNR", "--steps", "3", "--out", str(tmp_path / "s")])
    assert rc == 2 and f"pass --model '{spec}'" in capsys.readouterr().err  # the CLI names the flag


def _lit_checkpoint(tmp_path: Path, cls_name: str = "Lit", record: bool = False) -> tuple[dict, object]:
    import importlib
    import sys

    (tmp_path / "vrg_test_litmod.py").write_text(LIT)
    sys.path.insert(0, str(tmp_path))
    try:
        mod = importlib.import_module("vrg_test_litmod")
    finally:
        sys.path.remove(str(tmp_path))
    torch.manual_seed(0)
    m = getattr(mod, cls_name)()
    ckpt = {"state_dict": m.state_dict(), "hyper_parameters": dict(m.hparams), "pytorch-lightning_version": "2.6.0"}
    if record:
        ckpt["vrg"] = {"format": "vrg-lightning", "version": 1, "module": module_section(m, (4,))}
    return ckpt, m


def test_a_protocol_lightning_module_is_rebuilt_from_its_checkpoint(tmp_path: Path) -> None:
    ckpt, m = _lit_checkpoint(tmp_path, record=True)
    assert ckpt["vrg"]["module"] == {"class_path": "vrg_test_litmod:Lit", "sample_shape": [4]}
    loaded = load_model(ckpt)  # the recorded class path, hyper_parameters and weights (weights_only=True)
    den = loaded.denoiser
    assert loaded.kind == "lightning" and isinstance(den, ProtocolDenoiser) and den.sample_shape == (4,)
    assert den.schedule == NoiseSchedule("squaredcos_cap_v2") and not den.module.training
    x, ab = torch.randn(3, 4), torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(den(x, ab), m.net(x, ab))
        torch.testing.assert_close(den(x, torch.tensor(0.5)), m.net(x, torch.full((3,), 0.5)))  # ᾱ given as [B]
    rebuilt = load_lightning_module(type(m), ckpt)
    assert type(rebuilt) is type(m) and torch.equal(rebuilt.net.lin.weight, m.net.lin.weight)
    x = generate(den, torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64), "ddim", 5, seed=0)
    assert x.shape == (5, 4) and float(x.abs().max()) > 0  # any sample shape; not clamped (clip_range None)


def test_lightning_checkpoint_errors(tmp_path: Path) -> None:
    ckpt, _ = _lit_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="records no class path .*pass model='package.module:ClassName'"):
        load_model(ckpt)
    with pytest.raises(ValueError, match="sample shape of Lit is unknown: give sample_shape"):
        load_model(ckpt, model="vrg_test_litmod:Lit")
    assert load_model(ckpt, model="vrg_test_litmod:Lit", sample_shape=(4,)).kind == "lightning"
    bad = dict(ckpt, vrg={"format": "vrg-lightning", "version": 1, "module": {"class_path": "gone_pkg_xyz:Lit"}})
    with pytest.raises(ValueError, match="LightningModule class SPEC 'gone_pkg_xyz:Lit': no module named"):
        load_model(bad, sample_shape=(4,))
    filed = dict(ckpt, vrg={"format": "vrg-lightning", "version": 1, "module": {"class_path": "/x/train.py:Lit"}})
    with pytest.raises(ModelSpecRequired, match="defined in a file; pass model='/x/train.py:Lit'"):
        load_model(filed, sample_shape=(4,))  # a file named by a checkpoint is never run by itself
    no_proto, _ = _lit_checkpoint(tmp_path, "NoProtocol")
    with pytest.raises(ValueError, match="NoProtocol does not follow the VRG protocol: it lacks vrg_schedule"):
        load_model(no_proto, model="vrg_test_litmod:NoProtocol", sample_shape=(4,))


def _save_pipeline(tmp_path: Path, kind: str) -> Path:
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**TINY_UNET)
    sched = (DDPMScheduler if kind == "ddpm" else DDIMScheduler)(beta_schedule="squaredcos_cap_v2")
    pipe = (DDPMPipeline if kind == "ddpm" else DDIMPipeline)(unet=unet, scheduler=sched)
    pipe.save_pretrained(tmp_path / kind)
    return tmp_path / kind


@pytest.mark.parametrize("kind", ["ddpm", "ddim"])
def test_ddpm_and_ddim_pipeline_folders_load_as_the_unet_adapter(tmp_path: Path, kind: str) -> None:
    from diffusers import UNet2DModel

    folder = _save_pipeline(tmp_path, kind)
    loaded = load_model(diffusers_dir=folder)
    den = loaded.denoiser
    assert loaded.kind == "diffusers" and den.schedule.beta_schedule == "squaredcos_cap_v2"
    assert den.sample_shape == (1, 16, 16) and set(loaded.checkpoint["state_dict"]) == \
        {f"model.{k}" for k in den.state_dict()}
    unet = UNet2DModel.from_pretrained(folder / "unet")
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([3.0, 700.0])
    with torch.no_grad():
        torch.testing.assert_close(den.model_output(x, t), unet(x, t).sample)
    out = tmp_path / f"{kind}.pt"
    assert main(["profile", "--diffusers-dir", str(folder), "--data", "digits", "--out", str(out), "--samples", "64",
                 "--bins", "8", "--steps", "", "--device", "cpu"]) == 0
    again, _ = load_denoiser(out, use_ema=False)  # the file holds the UNet's weights: nothing else is needed
    with torch.no_grad():
        torch.testing.assert_close(again.model_output(x, t), unet(x, t).sample)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(dict(index, _class_name="StableDiffusionPipeline")))
    with pytest.raises(ValueError, match="component unet is .*UNet2DModel.*supported: .*UNet2DConditionModel"):
        load_diffusers_dir(folder)  # a StableDiffusionPipeline folder goes to the latent adapter, which names the fix
    (folder / "model_index.json").write_text(json.dumps(dict(index, _class_name="KandinskyPipeline")))
    with pytest.raises(ValueError, match="holds a KandinskyPipeline .*supported: DDPMPipeline, DDIMPipeline"):
        load_diffusers_dir(folder)


def test_features_spec_and_sample_files(tmp_path: Path, nets: Path) -> None:
    ext = build_features(f"{nets}:project", image_shape=(4,))
    assert ext.name == f"{nets}:project" and ext.num_features == 3 and ext(torch.zeros(5, 4)).shape == (5, 3)
    with pytest.raises(ValueError, match=r"must map samples \[B, \.\.\.\] to features \[B, D\]"):
        build_features(f"{nets}:bad_features", image_shape=(2, 2))  # Identity keeps [1, 2, 2]
    with pytest.raises(ValueError, match=r"features 'digits' take images \(C, H, W\) but the samples have shape"):
        build_features("digits", image_shape=(4,))
    assert build_features("pixels", image_shape=(4,))(torch.ones(2, 4)).shape == (2, 4)
    torch.save({"samples": torch.randn(10, 4), "labels": torch.arange(10)}, tmp_path / "d.pt")
    ds = load_dataset(str(tmp_path / "d.pt"))
    assert len(ds) == 10 and ds[3][0].shape == (4,) and int(ds[3][1]) == 3
    torch.save(torch.arange(10), tmp_path / "ints.pt")
    with pytest.raises(ValueError, match=r"must hold a float tensor \[N, \.\.\.\] of samples"):
        load_dataset(str(tmp_path / "ints.pt"))


def test_probe_refuses_data_of_another_sample_shape(nets: Path) -> None:
    den = load_model(model=f"{nets}:Oracle", sample_shape=(4,)).denoiser
    data = torch.utils.data.TensorDataset(torch.zeros(8, 5))
    with pytest.raises(ValueError, match=r"samples of shape \(5,\) but the model's sample_shape is \(4,\)"):
        probe_profile(den, data, SCHED, num_samples=8, num_bins=4)
    prof = probe_profile(den, torch.utils.data.TensorDataset(torch.full((8, 4), 0.5)), SCHED, num_samples=64,
                         num_bins=4)
    assert float(prof.count.sum()) == 64 and float(prof.mse_function("paper")(torch.tensor(0.5))) < 1e-10


def test_cli_bad_input_errors(tmp_path: Path, nets: Path, capsys) -> None:
    torch.save(torch.randn(16, 4), tmp_path / "data.pt")
    base = ["profile", "--data", str(tmp_path / "data.pt"), "--out", str(tmp_path / "p.pt"), "--samples", "16",
            "--steps", ""]
    cases = [
        (["--model", f"{nets}:Oracle", "--sample-shape", "5"],
         r"--data .*data.pt' gives samples of shape \(4,\); the model needs \(5,\)"),
        (["--model", f"{nets}:Oracle", "--data", "digits"], r"needs --sample-shape \.\.\., the shape of one sample"),
        (["--model", f"{nets}:Oracle", "--data", "digits", "--sample-shape", "4"],
         "is a dataset of images but the model makes samples"),
        (["--model", f"{nets}:Oracle", "--schedule", "nope"], "--schedule must be a beta-schedule name"),
        (["--model", "nets_missing.py:Oracle"], "no such file 'nets_missing.py'"),
        (["--model", f"{nets}:WrongShape"], r"returned shape \(2, 3\)"),
        ([], "needs a model: --ckpt CKPT, --model SPEC or --diffusers-dir DIR"),
    ]
    for extra, message in cases:
        assert main(base + extra) == 2, extra
        err = capsys.readouterr().err
        assert re.search(message, err), (extra, err)
    assert not (tmp_path / "p.pt").exists()  # nothing half-written
    assert main(base + ["--model", f"{nets}:Oracle", "--prediction-type", "x0"]) == 2
    assert "invalid choice: 'x0'" in capsys.readouterr().err
    assert main(base + ["--model", f"{nets}:Oracle", "--sample-shape", "4,a"]) == 2
    assert "--sample-shape must be positive integers" in capsys.readouterr().err


def test_module_section_and_spec_settings_round_trip(tmp_path: Path, nets: Path) -> None:
    loaded = load_model(model=f"{nets}:Oracle", sample_shape="2,3", prediction_type="sample")
    assert loaded.sections == {"model": {"spec": f"{nets}:Oracle", "sample_shape": [2, 3],
                                         "prediction_type": "sample", "num_classes": None}}
    assert loaded.denoiser.config()["spec"] == f"{nets}:Oracle" and loaded.denoiser.clip_range is None
