"""support/metrics.py: feature statistics, the Frechet distance against closed forms, and EDM's FID path through
clean-fid's Inception (with stand-ins: the real network cannot be downloaded here)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_edm import http_server

from support import metrics as ti
from support.metrics import (
    MeanCov,
    fid_from_statistics,
    images_to_uint8,
    inception_extractor,
    load_reference_statistics,
)
from support.runs import stream_seed

# ----------------------------------------------------------------------------------------------------
# FID statistics


OFFSET = 1e4  # large, so that a float32 or sum-of-squares computation would lose the covariance


def linear_map(dim_in: int, dim_out: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((dim_in, dim_out))


def linear_extractor(w: np.ndarray):
    """Features: a fixed linear map of the flattened pixels plus a large offset, float64."""
    return lambda images: images.flatten(1).double() @ torch.from_numpy(w) / 255 + OFFSET


def feature_statistics(batches, extractor) -> tuple[np.ndarray, np.ndarray]:
    """Statistics of extractor(batch) accumulated batch by batch, as the evaluation does."""
    stats = MeanCov()
    for batch in batches:
        stats.update(extractor(batch))
    return stats.result()


@settings(deadline=None, max_examples=15)
@given(sizes=st.lists(st.integers(0, 9), min_size=1, max_size=6).filter(lambda s: sum(s) >= 2),
       seed=st.integers(0, 2**16))
def test_feature_statistics_equal_numpy_mean_and_unbiased_cov(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (sum(sizes), 1, 3, 3), dtype=torch.uint8, generator=g)
    w = linear_map(9, seed=seed)
    mu, sigma = feature_statistics(iter(images.split(sizes)), linear_extractor(w))  # batch by batch
    feats = images.numpy().reshape(len(images), -1).astype(np.float64) @ w / 255 + OFFSET  # all at once, numpy
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False, ddof=1), rtol=1e-9, atol=1e-9)


def test_covariance_of_identical_features_is_zero():
    # the covariance sum must start from zeros: constant features have exactly zero covariance
    batches = [torch.full((4, 3, 2, 2), 7, dtype=torch.uint8)] * 3
    mu, sigma = feature_statistics(batches, lambda x: x.flatten(1)[:, :3].double())
    assert np.array_equal(sigma, np.zeros((3, 3))) and np.array_equal(mu, np.full(3, 7.0))


def test_mean_cov_merge_equals_pooled():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 4, generator=g) + 3, torch.randn(30, 4, generator=g) * 2
    one, two, pooled = MeanCov(), MeanCov(), MeanCov()
    one.update(a)
    two.update(b)
    pooled.update(torch.cat([a, b]))
    one.merge(two.n, two.mean, two.m2)  # e.g. another rank's statistics
    for x, y in zip(one.result(), pooled.result(), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)


def test_feature_statistics_errors():
    extract = ti._edm_detector_input(lambda images: images.flatten(1).float(), torch.device("cpu"))
    with pytest.raises(ValueError, match="uint8 images"):
        extract(torch.rand(2, 1, 2, 2))
    with pytest.raises(ValueError, match="uint8 images"):
        extract(torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="1 or 3 channels"):
        extract(torch.zeros(2, 2, 2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics([torch.zeros(1, 1, 2, 2, dtype=torch.uint8)], extract)
    with pytest.raises(ValueError, match="must be \\[B, D\\]"):
        MeanCov().update(torch.zeros(3))


def test_generated_stats_quantise_and_split_over_ranks():
    """The evaluation path: samples -> uint8 as saved PNGs -> features, batch by batch, against numpy on the
    same samples; two ranks' statistics merged equal those of the union of their samples."""
    def sample_fn(z, labels):
        return torch.tanh(z) * 0.9 + labels.reshape(-1, 1, 1, 1) / 20
    def extractor(images):
        assert images.dtype == torch.uint8
        return images.flatten(1).double(), None

    def reference(seed: int, sizes: list[int]) -> np.ndarray:  # the same draws, written out
        g, rows = torch.Generator().manual_seed(seed), []
        for b in sizes:
            labels = torch.randint(0, 10, (b,), generator=g)
            rows.append(images_to_uint8(sample_fn(torch.randn(b, 1, 2, 2, generator=g), labels)).flatten(1))
        return torch.cat(rows).double().numpy()

    one, *_ = ti.generated_stats(sample_fn, (1, 2, 2), 10, 4, 10, extractor, seed=3, device="cpu")
    feats = reference(stream_seed(3, "eval", 0), [4, 4, 2])
    np.testing.assert_allclose(one.result()[0], feats.mean(0), rtol=1e-12)
    np.testing.assert_allclose(one.result()[1], np.cov(feats, rowvar=False), rtol=1e-9, atol=1e-9)
    parts = [ti.generated_stats(sample_fn, (1, 2, 2), 10, 4, 10, extractor, 3, "cpu", rank=r, world=2)[0]
             for r in range(2)]
    assert [p.n for p in parts] == [5, 5]
    parts[0].merge(parts[1].n, parts[1].mean, parts[1].m2)
    union = np.concatenate([reference(stream_seed(3, "eval", r), [4, 1]) for r in range(2)])
    np.testing.assert_allclose(parts[0].result()[1], np.cov(union, rowvar=False), rtol=1e-9, atol=1e-9)


def commuting_gaussians(dim: int, seed: int):
    """Two Gaussians whose covariances share eigenvectors Q: S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T, so that
    (S1 S2)^(1/2) = Q diag(sqrt(a b)) Q^T and FD = |mu1 - mu2|^2 + sum(a + b - 2 sqrt(a b))."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    a, b = rng.uniform(0.1, 3, dim), rng.uniform(0.1, 3, dim)
    mu1, mu2 = rng.standard_normal(dim), rng.standard_normal(dim)
    closed_form = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    return (mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T), closed_form


@settings(deadline=None, max_examples=20)
@given(dim=st.integers(2, 12), seed=st.integers(0, 2**16))  # SciPy 1.17's sqrtm(disp=False) breaks on 1x1
def test_fid_equals_closed_form_for_commuting_covariances(dim, seed):
    stats, closed_form = commuting_gaussians(dim, seed)
    assert fid_from_statistics(*stats) == pytest.approx(closed_form, rel=1e-8, abs=1e-9)


def gaussian_features(mu: np.ndarray, sigma: np.ndarray, n: int, seed: int) -> np.ndarray:
    """n samples [n, D] whose sample mean is exactly mu and whose unbiased sample covariance is exactly sigma."""
    z = np.random.default_rng(seed).standard_normal((n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # now cov(z) = I
    return mu + z @ np.linalg.cholesky(sigma).T


def serve(features: np.ndarray):
    """An extractor that ignores the pixels and hands out the given features, batch after batch."""
    rows = iter(torch.from_numpy(features))
    return lambda images: torch.stack([next(rows) for _ in range(len(images))])


def test_fid_of_computed_statistics_equals_closed_form():
    """Features of two Gaussians, served batch by batch: the FID of what feature_statistics computes equals the
    closed form of the two Gaussians."""
    (mu1, s1, mu2, s2), closed_form = commuting_gaussians(6, seed=7)
    batches = [torch.zeros(64, 1, 1, 1, dtype=torch.uint8)] * 10 + [torch.zeros(3, 1, 1, 1, dtype=torch.uint8)]
    stats1 = feature_statistics(batches, serve(gaussian_features(mu1, s1, 643, seed=1)))
    stats2 = feature_statistics(batches, serve(gaussian_features(mu2, s2, 643, seed=2)))
    assert closed_form > 1
    assert fid_from_statistics(*stats1, *stats2) == pytest.approx(closed_form, rel=1e-9)
    assert fid_from_statistics(*stats1, *stats1) == pytest.approx(0, abs=1e-9)


def test_fid_rejects_mismatched_statistics():
    with pytest.raises(ValueError, match="do not match"):
        fid_from_statistics(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_images_to_uint8_matches_edm_generate():
    # EDM's generate.py: (x * 127.5 + 128).clip(0, 255).to(uint8), i.e. round half up of x 127.5 + 127.5
    x = torch.tensor([-2.0, -1.0, -1 + 0.4 / 127.5, -1 + 0.6 / 127.5, 0.0, 1 - 0.6 / 127.5, 1.0, 3.0])
    assert images_to_uint8(x).tolist() == [0, 0, 0, 1, 128, 254, 255, 255]


class FakeInceptionTorchScript(torch.nn.Module):
    """Stands in for clean-fid's inception-2015-12-05.pt (not downloadable here), with its interface:
    forward(img, return_features) on NCHW images with 3 channels in 0..255 -> [B, 2048] features."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Identity()  # clean-fid's wrapper reads base.layers
        self.seen: list[torch.Tensor] = []

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert return_features and img.shape[1] == 3
        self.seen.append(img)
        return img.to(torch.float32).mean((2, 3)).repeat(1, 683)[:, :2048]


def test_inception_extractor_feeds_clean_fid_legacy_tensorflow_like_edm(monkeypatch):
    """Through clean-fid's real code (build_feature_extractor -> InceptionV3W with its internal resize), with the
    TorchScript file replaced: the network gets uint8 NCHW, 3 channels, unresized, as EDM's detector does."""
    fake, loaded = FakeInceptionTorchScript(), []
    import cleanfid.inception_torchscript

    monkeypatch.setattr(cleanfid.inception_torchscript, "check_download_inception", lambda fpath: None)
    monkeypatch.setattr(torch.jit, "load", lambda path: loaded.append(path) or fake)
    extract = inception_extractor("cpu")
    assert [os.path.basename(p) for p in loaded] == ["inception-2015-12-05.pt"]
    gray = torch.randint(0, 256, (2, 1, 5, 7), dtype=torch.uint8)
    features = extract(gray)
    assert features.shape == (2, 2048) and features.dtype == torch.float32
    assert fake.seen[0].dtype == torch.uint8 and fake.seen[0].shape == (2, 3, 5, 7)
    assert all(torch.equal(fake.seen[0][:, c], gray[:, 0]) for c in range(3)), "grayscale repeated to RGB"
    rgb = torch.randint(0, 256, (3, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(extract(rgb), rgb.float().mean((2, 3)).repeat(1, 683)[:, :2048])
    assert torch.equal(fake.seen[1], rgb)
    for bad in (rgb.float(), rgb[:, :2], rgb[0]):
        with pytest.raises(ValueError, match="uint8 images|1 or 3 channels"):
            extract(bad)
    mu, sigma = feature_statistics([rgb, gray[:, :, :4, :4]], extract)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)


def test_inception_extractor_download_failure_is_clear(monkeypatch):
    def offline(fpath):
        raise ti.urllib.error.URLError("no network")

    import cleanfid.inception_torchscript

    monkeypatch.setattr(cleanfid.inception_torchscript, "check_download_inception", offline)
    with pytest.raises(FileNotFoundError, match="could not load its Inception-v3.*inception-2015-12-05.pt"):
        inception_extractor("cpu")


def test_load_reference_statistics(tmp_path):
    stats, _ = commuting_gaussians(4, seed=1)
    np.savez(tmp_path / "ref.npz", mu=stats[0].astype(np.float32), sigma=stats[1])
    mu, sigma = load_reference_statistics(str(tmp_path / "ref.npz"))
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_array_equal(mu, stats[0].astype(np.float32))
    np.testing.assert_array_equal(sigma, stats[1])
    with http_server(str(tmp_path)) as url:
        from_url = load_reference_statistics(f"{url}/ref.npz", cache_dir=str(tmp_path / "cache"))
    np.testing.assert_array_equal(from_url[1], sigma)
    np.savez(tmp_path / "mu_only.npz", mu=stats[0])
    with pytest.raises(ValueError, match=r"lacks \['sigma'\]; found \['mu'\]"):
        load_reference_statistics(str(tmp_path / "mu_only.npz"))
    np.save(tmp_path / "array.npy", stats[1])
    with pytest.raises(ValueError, match="single array"):
        load_reference_statistics(str(tmp_path / "array.npy"))
    (tmp_path / "text.npz").write_text("mu, sigma")
    with pytest.raises(ValueError, match="not an .npz file"):
        load_reference_statistics(str(tmp_path / "text.npz"))
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.eye(4))
    with pytest.raises(ValueError, match=r"must be \[D\] and \[D, D\]"):
        load_reference_statistics(str(tmp_path / "bad.npz"))
    with pytest.raises(FileNotFoundError):
        load_reference_statistics(str(tmp_path / "none.npz"))


def test_features_are_fp32_under_bf16_autocast():
    """EDM's fid.py runs the detector in fp32: an enclosing bf16 autocast (the training loop's) must not reach it."""
    w = torch.randn(3 * 8 * 8, 16, generator=torch.Generator().manual_seed(0))
    extract = ti._edm_detector_input(lambda images: images.flatten(1).float() @ w, torch.device("cpu"))
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = extract(images)
    assert torch.equal(under_autocast, extract(images)) and under_autocast.dtype == torch.float32


def unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """MMD^2 with k(a, b) = (a.b / d + 1)^3, the unbiased estimator of Binkowski et al. (2018), written out."""
    d, m, n = x.shape[1], len(x), len(y)
    kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


@given(st.integers(3, 40), st.integers(1, 6), st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_kid_is_the_unbiased_polynomial_mmd(n, d, seed):
    """Subsets as large as both sets are the whole sets: every subset gives the same exact value, spread 0."""
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((n, d)), rng.standard_normal((n, d)) + 0.5
    mean, std = ti.kid(x, y, subsets=5, subset_size=n)
    assert mean == pytest.approx(unbiased_mmd2(x, y), rel=1e-9, abs=1e-12) and std == pytest.approx(0, abs=1e-9)


@given(st.integers(2, 30), st.integers(2, 30), st.integers(1, 5), st.integers(2, 40), st.integers(0, 2**16))
@settings(max_examples=25, deadline=None)
def test_kid_equals_clean_fids_kernel_distance_subset_by_subset(n1, n2, d, size, seed):
    """The same subsets as clean-fid's kernel_distance draws from numpy's generator seeded with `seed`, and the
    same value for each, to rounding (clean-fid computes in numpy; kid in torch)."""
    from cleanfid.fid import kernel_distance

    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((n1, d)) * 3, rng.standard_normal((n2, d)) + 0.5
    state = np.random.get_state()
    np.random.seed(seed)
    expected = [kernel_distance(x, y, num_subsets=1, max_subset_size=size) for _ in range(4)]
    np.random.set_state(state)
    mean, std = ti.kid(x, y, subsets=4, subset_size=size, seed=seed)
    assert mean == pytest.approx(np.mean(expected), rel=1e-9, abs=1e-9)
    assert std == pytest.approx(np.std(expected), rel=1e-7, abs=1e-9)


def test_kid_has_no_sample_size_bias_and_reports_its_spread():
    """Two samples of one distribution: KID averages 0 at any size, where the Frechet distance is biased
    upwards the more the fewer samples; a shifted distribution scores clearly above its spread."""
    rng = np.random.default_rng(0)
    same = [ti.kid(rng.standard_normal((200, 8)), rng.standard_normal((200, 8)), subsets=20, subset_size=100)
            for _ in range(20)]
    means = np.array([m for m, _ in same])
    assert abs(means.mean()) < 3 * means.std() / np.sqrt(len(means)) and all(s > 0 for _, s in same)
    shifted, spread = ti.kid(rng.standard_normal((200, 8)), rng.standard_normal((200, 8)) + 1.0, subsets=20,
                             subset_size=100)
    assert shifted > 10 * spread
    x, y = rng.standard_normal((50, 4)), rng.standard_normal((50, 4))
    state = np.random.get_state()[1].copy()
    assert ti.kid(x, y, subsets=5, subset_size=20, seed=3) == ti.kid(x, y, subsets=5, subset_size=20, seed=3)
    assert ti.kid(x, y, subsets=5, subset_size=20, seed=3) != ti.kid(x, y, subsets=5, subset_size=20, seed=4)
    assert (np.random.get_state()[1] == state).all(), "numpy's global generator is left as it was"
    with pytest.raises(ValueError, match="KID needs"):
        ti.kid(np.ones((5, 2)), np.ones((5, 3)))
    with pytest.raises(ValueError, match="KID needs"):
        ti.kid(np.ones((5, 2)), np.ones((5, 2)), subset_size=1)
