"""FID feature extractors, feature statistics (one implementation: sums add, reduce across processes), the FID
against scipy and torchmetrics, the reference cache and the InceptionV3 path (random local weights)."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from scipy import linalg

from vrg_lightning.evaluation import (
    DIGITS_ASSET,
    INCEPTION_WEIGHTS_URL,
    DigitsClassifier,
    FeatureStats,
    FIDResult,
    build_features,
    feature_stats,
    fid_from_stats,
    fid_of,
    reduce_feature_stats,
    reference_key,
    reference_stats,
)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 8 - 1, torch.tensor(d.target)


def _scipy_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_old_import_path_is_the_same_implementation() -> None:
    from vrg_lightning import metrics

    assert metrics.feature_stats is feature_stats and metrics.FeatureStats is FeatureStats
    assert not hasattr(metrics, "make_fid_metric")  # the torchmetrics sum container is gone


def test_digits_asset_is_plain_state_dict_and_classifies() -> None:
    assert DIGITS_ASSET.stat().st_size < 200_000
    state = torch.load(DIGITS_ASSET, weights_only=True)
    net = DigitsClassifier()
    net.load_state_dict(state)
    x, y = _digits()
    with torch.no_grad():
        acc = float((net(x).argmax(1) == y).float().mean())
        x16 = torch.nn.functional.interpolate(x, scale_factor=2, mode="bilinear")  # the 16x16 training data
        acc16 = float((net(torch.nn.functional.adaptive_avg_pool2d(x16, 8)).argmax(1) == y).float().mean())
    assert acc > 0.97 and acc16 > 0.97


def test_fid_matches_scipy_reference() -> None:
    g = torch.Generator().manual_seed(0)
    ext = build_features("pixels", image_shape=(1, 3, 3))
    a = torch.rand(200, 1, 3, 3, generator=g) * 2 - 1
    b = torch.randn(150, 1, 3, 3, generator=g) * 0.5 + 0.1
    ref = feature_stats(a, ext, batch_size=64)
    res = fid_of(b, ext, ref, batch_size=32)
    expected = _scipy_fid(b.flatten(1).double().numpy(), a.flatten(1).double().numpy())
    assert res.value == pytest.approx(expected, rel=1e-6)
    assert res.label == "FID[pixels]" and str(res).startswith("FID[pixels]=")
    assert res.num_images == 150 and res.num_reference == 200
    assert fid_of(a, ext, ref).value == pytest.approx(0.0, abs=1e-6)
    # the reference's square root is computed once and reused; a second set against it gives scipy's value too
    root = ref.cov_root
    assert ref.cov_root is root and "cov_root" not in ref.to_dict()
    expected_a = _scipy_fid(a[:120].flatten(1).double().numpy(), a.flatten(1).double().numpy())
    assert fid_of(a[:120], ext, ref).value == pytest.approx(expected_a, rel=1e-6, abs=1e-9)


def test_fid_equals_torchmetrics_on_the_same_features() -> None:
    from torchmetrics.image.fid import FrechetInceptionDistance

    g = torch.Generator().manual_seed(1)
    ext = build_features("pixels", image_shape=(1, 4, 4))
    a, b = torch.rand(80, 1, 4, 4, generator=g) * 2 - 1, torch.rand(60, 1, 4, 4, generator=g) * 1.6 - 0.9
    ref = feature_stats(a, ext)
    tm = FrechetInceptionDistance(feature=ext, normalize=True)
    tm.update(a, real=True)
    for chunk in b.split(16):
        tm.update(chunk, real=False)
    fake = feature_stats(b, ext, batch_size=7)
    assert torch.allclose(tm.real_features_sum, ref.sum, rtol=1e-12) and int(tm.fake_features_num_samples) == 60
    assert torch.allclose(tm.fake_features_cov_sum, fake.cov_sum, rtol=1e-12)
    expected = float(tm.compute())
    assert fid_from_stats(fake, ref) == pytest.approx(expected, rel=1e-6)
    assert fid_of(b, ext, ref).value == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(_scipy_fid(b.flatten(1).double().numpy(), a.flatten(1).double().numpy()),
                                     rel=1e-6)


def test_sums_of_parts_equal_the_whole() -> None:
    g = torch.Generator().manual_seed(2)
    ext = build_features("pixels", image_shape=(1, 3, 3))
    x, ref = torch.rand(101, 1, 3, 3, generator=g) * 2 - 1, feature_stats(torch.randn(90, 1, 3, 3, generator=g), ext)
    whole = feature_stats(x, ext)
    halves = feature_stats(x[:40], ext) + feature_stats(iter(x[40:].split(13)), ext)
    assert halves.n == whole.n == 101
    assert torch.allclose(halves.sum, whole.sum, rtol=1e-13) and torch.allclose(halves.cov_sum, whole.cov_sum,
                                                                                 rtol=1e-13)
    assert fid_from_stats(halves, ref) == pytest.approx(fid_from_stats(whole, ref), rel=1e-12)
    empty = feature_stats(iter([]), ext)  # a rank without images takes part with zero sums
    assert empty.n == 0 and torch.equal((empty + whole).cov_sum, whole.cov_sum)
    assert FIDResult.from_stats(whole, ref).num_images == 101
    with pytest.raises(ValueError, match="Cannot add 'other' statistics"):
        whole + FeatureStats.zeros(9, "other")
    with pytest.raises(ValueError, match="at least 2 images"):
        fid_from_stats(empty, ref)


def _reduce_worker(rank: int, port: int, parts: list[dict], queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank), NODE_RANK="0")
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.strategies import DDPStrategy

    strategy = DDPStrategy(parallel_devices=[torch.device("cpu")] * 2, cluster_environment=LightningEnvironment(),
                           process_group_backend="gloo")
    strategy._local_rank = rank
    strategy.setup_distributed()
    local = FeatureStats.from_dict(parts[rank])
    total = reduce_feature_stats(local, strategy)
    untouched = torch.equal(local.sum, FeatureStats.from_dict(parts[rank]).sum)  # the reduce works on a copy
    queue.put((rank, total.n, total.sum.tolist(), total.cov_sum.tolist(), total.features, untouched))  # plain data
    torch.distributed.destroy_process_group()


def test_reduce_across_two_processes_gives_the_union() -> None:
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(3)
    ext = build_features("pixels", image_shape=(1, 2, 2))
    x = torch.rand(50, 1, 2, 2, generator=g) * 2 - 1
    parts = [{k: v.tolist() if torch.is_tensor(v) else v for k, v in feature_stats(p, ext).to_dict().items()}
             for p in (x[:17], x[17:])]
    whole = feature_stats(x, ext)
    assert reduce_feature_stats(whole, object()) is whole  # one process: nothing to reduce
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_reduce_worker, args=(port, parts, queue), nprocs=2, start_method="spawn")
    results = sorted(queue.get() for _ in range(2))
    assert [r[0] for r in results] == [0, 1]
    for _, n, total_sum, cov_sum, features, local_untouched in results:
        assert local_untouched and n == 50 and features == "pixels"
        assert torch.allclose(torch.tensor(total_sum, dtype=torch.float64), whole.sum, rtol=1e-13)
        assert torch.allclose(torch.tensor(cov_sum, dtype=torch.float64), whole.cov_sum, rtol=1e-13)


def test_digits_features_separate_digits_from_noise() -> None:
    x, _ = _digits()
    ext = build_features("digits")
    ref = feature_stats(x[:900], ext)
    same = fid_of(x[900:], ext, ref).value
    g = torch.Generator().manual_seed(0)
    noise = fid_of(torch.rand(897, 1, 8, 8, generator=g) * 2 - 1, ext, ref).value
    assert same * 20 < noise
    up = torch.nn.functional.interpolate(x[900:], scale_factor=2, mode="nearest")  # 16x16 pools back exactly
    assert fid_of(up, ext, ref).value == pytest.approx(same, rel=1e-5)
    assert fid_of(up, ext, ref).features == "digits-classifier"


@pytest.mark.parametrize(
    ("features", "shape", "match"),
    [
        ("digits", (2, 3, 8, 8), "1 channel"),
        ("digits", (2, 1, 12, 12), "multiple of 8"),
        ("pixels", (2, 1, 8, 9), r"shape \(1, 8, 8\)"),
        ("pixels", (2, 8, 8), r"\[N, C, H, W\]"),
    ],
)
def test_input_checks(features: str, shape: tuple[int, ...], match: str) -> None:
    ext = build_features(features, image_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=match):
        ext(torch.zeros(shape))


def test_unknown_features_and_stats_mismatch() -> None:
    with pytest.raises(ValueError, match="Unknown features 'clip'"):
        build_features("clip")
    with pytest.raises(ValueError, match="image_shape"):
        build_features("pixels")
    ref = feature_stats(torch.zeros(4, 1, 8, 8).uniform_(-1, 1), build_features("pixels", image_shape=(1, 8, 8)))
    with pytest.raises(ValueError, match="cannot be compared"):
        fid_of(torch.zeros(4, 1, 8, 8), build_features("digits"), ref)


def test_user_module_features() -> None:
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 5))
    ext = build_features(net, image_shape=(1, 4, 4))
    assert ext.num_features == 5 and ext.name == "module-Sequential"
    g = torch.Generator().manual_seed(0)
    a = torch.rand(30, 1, 4, 4, generator=g)
    with torch.no_grad():
        expected = _scipy_fid(net(a[15:]).double().numpy(), net(a[:15]).double().numpy())
    assert fid_of(a[15:], ext, feature_stats(a[:15], ext)).value == pytest.approx(expected, rel=1e-5)


def test_reference_stats_are_cached_by_dataset_and_features(tmp_path: Path) -> None:
    calls: list[str] = []
    x, _ = _digits()

    def images() -> torch.Tensor:
        calls.append("x")
        return x[:100]

    ext = build_features("digits")
    s1 = reference_stats("digits", ext, images, cache_dir=tmp_path, progress=False)
    s2 = reference_stats("digits", ext, images, cache_dir=tmp_path, progress=False)
    assert calls == ["x"] and s2.n == 100 and torch.equal(s1.cov_sum, s2.cov_sum)
    files = sorted(p.name for p in (tmp_path / "fid-stats").iterdir())
    assert files == [f"digits--digits-classifier--{ext.weights_hash}.pt"]
    reference_stats("digits", build_features("pixels", image_shape=(1, 8, 8)), images, cache_dir=tmp_path,
                    progress=False)
    reference_stats("other", ext, images, cache_dir=tmp_path, progress=False)
    assert len(calls) == 3 and len(list((tmp_path / "fid-stats").iterdir())) == 3
    loaded = torch.load(tmp_path / "fid-stats" / files[0], weights_only=True)
    assert FeatureStats.from_dict(loaded).features == "digits-classifier"


def test_missing_inception_weights_error_says_where_to_get_them(tmp_path: Path) -> None:
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError) as info:
        build_features("inception", inception_weights=missing)
    msg = str(info.value)  # library wording names the argument; the commands name the flag
    assert INCEPTION_WEIGHTS_URL in msg and "inception_weights" in msg and str(missing) in msg
    with pytest.raises(FileNotFoundError, match="no weights file was given"):
        build_features("inception")


def _random_inception_weights(path: Path) -> None:
    """A randomly initialised state_dict with torch-fidelity's InceptionV3 keys (no download)."""
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None):
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)


def test_inception_path_end_to_end_with_random_local_weights(tmp_path: Path) -> None:
    weights = tmp_path / "inception.pth"
    _random_inception_weights(weights)
    ext = build_features("inception", inception_weights=weights)
    assert ext.name == "inception-v3-2048" and ext.num_features == 2048
    g = torch.Generator().manual_seed(0)
    real = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    fake = (torch.rand(2, 3, 16, 16, generator=g) * 2 - 1) * 0.5
    ref = reference_stats("tiny", ext, lambda: real, cache_dir=tmp_path, progress=False)
    res = fid_of(fake, ext, ref)
    assert res.label == "FID[inception-v3-2048]" and np.isfinite(res.value) and res.value > 0

    # same features as torchmetrics' own InceptionV3 wrapper (same weights, TF1-style resize) on uint8 images
    from torchmetrics.image.fid import NoTrainInceptionV3

    tm = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(weights), antialias=False)
    with torch.no_grad():
        expected = tm(((fake + 1) * 127.5).round().to(torch.uint8))
        assert torch.allclose(ext(fake), expected, rtol=1e-5, atol=1e-5)

    gray = real[:1, :1]
    assert torch.equal(ext(gray), ext(gray.expand(-1, 3, -1, -1)))  # 1-channel images are repeated to RGB
    with pytest.raises(ValueError, match="1 or 3 channel"):
        ext(torch.zeros(2, 4, 16, 16))


def test_reference_key_separates_image_shapes_and_resolves_folders(tmp_path, monkeypatch) -> None:
    assert reference_key("patches", (3, 16, 16)) != reference_key("patches", (3, 32, 32))
    assert reference_key("digits", (1, 16, 16), 500) != reference_key("digits", (1, 16, 16))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a" / "imgs").mkdir(parents=True)
    (tmp_path / "b" / "imgs").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    key_a = reference_key("folder:imgs", (3, 16, 16))
    monkeypatch.chdir(tmp_path / "b")
    assert reference_key("folder:imgs", (3, 16, 16)) != key_a  # same relative path, different folders
