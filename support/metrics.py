"""Evaluation metrics, computed as the papers they are compared with compute them.

    images_to_uint8, MeanCov, inception_extractor, load_reference_statistics, fid_from_statistics
                          FID as EDM's fid.py computes it (ImageNet-64, App. G): uint8 samples, Inception-v3 pool
                          features in fp32, float64 statistics, EDM's reference .npz
    kid                   clean-fid's unbiased kernel distance (KID) over random subsets, with its standard deviation
    generated_stats       feature statistics (and label accuracy) of generated samples, split over ranks
    folder_fid, clip_score
                          text-to-image (App. G): clean-fid FID and patch FID of image folders, OpenCLIP CLIP score
"""

from __future__ import annotations

import math
import urllib.error
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from support.edm_pickle import local_file
from support.runs import require, stream_seed

# ----------------------------------------------------------------------------------------------------
# FID comparable with EDM's: DMD2 reports ImageNet-64 FID of 50,000 samples "using EDM's evaluation code"
# (App. G), against EDM's reference statistics 'imagenet-64x64.npz' (not '-baseline.npz', which is for ADM).
#
# EDM's fid.py: StyleGAN3's Inception-v3 detector ('inception-2015-12-05.pkl', NVIDIA's PyTorch translation of
# the TensorFlow graph inception-2015-12-05) called as detector(images, return_features=True) on uint8 NCHW
# images with 3 channels (grayscale repeated) -> 2048-d pool features; mean and unbiased (n - 1) covariance
# accumulated in float64; FD = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)). clean-fid's "legacy_tensorflow"
# extractor runs the TorchScript export of the same translation ('inception-2015-12-05.pt', StyleGAN2-ADA's
# detector) as base(images, return_features=True) on the images as given; the network itself casts them to
# float32, resizes to 299x299 (TensorFlow's bilinear resize) and scales to [-1, 1], so uint8 in gives what
# EDM's detector computes. Samples become uint8 exactly as EDM's generate.py writes its PNGs.


def images_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Generator output in [-1, 1] -> uint8 the way EDM's generate.py writes its PNGs: (x 127.5 + 128),
    clipped and truncated, i.e. round(x 127.5 + 127.5) with halves rounded up."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


class MeanCov:
    """Running mean and covariance of feature vectors, in float64, merged batch by batch (Chan et al. 1979):
    exact for any number of batches, and free of the cancellation of sum(x x^T) - n mu mu^T. Starts from
    zeros (the DMD2 authors' ImageNet FID code starts its covariance sum from ones)."""

    def __init__(self, keep: bool = False) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None  # [D]
        self.m2: torch.Tensor | None = None  # [D, D], sum of outer products of deviations from the mean
        self.kept: list[torch.Tensor] | None = [] if keep else None  # the features themselves (for KID)

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features [B, D]."""
        require(features.ndim == 2, f"features must be [B, D], got {list(features.shape)}")
        if len(features) == 0:
            return
        f = features.detach().to(torch.float64)
        if self.kept is not None:
            self.kept.append(features.detach().float().cpu())
        mean = f.mean(0)
        centred = f - mean
        self.merge(len(f), mean, centred.T @ centred)

    def merge(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        """Add the statistics (count, mean, m2) of another set, e.g. another rank's `MeanCov`."""
        if self.mean is None:
            self.mean, self.m2 = torch.zeros_like(mean, dtype=torch.float64), torch.zeros_like(m2, dtype=torch.float64)
        if n == 0:
            return
        if mean.shape != self.mean.shape:
            raise ValueError(f"feature dimension changed from {self.mean.shape[0]} to {mean.shape[0]}")
        total = self.n + n
        delta = mean.to(self.mean) - self.mean
        self.mean += delta * (n / total)
        self.m2 += m2.to(self.m2) + torch.outer(delta, delta) * (self.n * n / total)
        self.n = total

    def features(self) -> np.ndarray:
        """The features added so far [N, D] (float32), if kept."""
        require(self.kept is not None, "features were not kept (MeanCov(keep=True))")
        return torch.cat(self.kept).numpy()

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], sigma [D, D]) as float64 numpy arrays; sigma is the unbiased covariance, as EDM's."""
        require(self.n >= 2, f"need at least 2 feature vectors for a covariance, got {self.n}")
        return self.mean.cpu().numpy(), (self.m2 / (self.n - 1)).cpu().numpy()


def inception_extractor(device: torch.device | str) -> Callable[[torch.Tensor], torch.Tensor]:
    """EDM's FID feature detector through clean-fid: uint8 [B, C, H, W] -> float32 [B, 2048].

    clean-fid's "legacy_tensorflow" mode loads the TorchScript Inception-v3 from /tmp/inception-2015-12-05.pt,
    downloading it on first use (on a machine without internet, put the file there). Images go in as EDM's
    fid.py gives them to its detector: uint8, NCHW, any size (resized to 299x299 inside), grayscale repeated
    to 3 channels."""
    import cleanfid.downloads_helper
    import cleanfid.features

    device = torch.device(device)
    try:
        model = cleanfid.features.build_feature_extractor("legacy_tensorflow", device=device, use_dataparallel=False)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        # clean-fid downloads without a temporary file: an interrupted download leaves a truncated file behind
        raise FileNotFoundError(f"clean-fid could not load its Inception-v3 ({type(e).__name__}: {e}). Put "
                           f"{cleanfid.downloads_helper.inception_url} at /tmp/inception-2015-12-05.pt (and delete "
                           f"a partial file there, if any)") from e
    return _edm_detector_input(model, device)


def _edm_detector_input(model: Callable[[torch.Tensor], torch.Tensor],
                        device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a detector so that it receives exactly what EDM's fid.py passes to its own."""

    @torch.no_grad()
    def extract(images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
            what = f"{images.dtype} {list(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected uint8 images [B, C, H, W] in 0..255 (see images_to_uint8), got {what}")
        require(images.shape[1] in (1, 3), f"images must have 1 or 3 channels, got {images.shape[1]}")
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)  # EDM's fid.py does the same
        with torch.autocast(device.type, enabled=False):  # fp32 features whatever the caller's autocast
            return model(images.to(device)).float()

    return extract


def load_reference_statistics(path_or_url: str, cache_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) from an .npz with keys 'mu' [D] and 'sigma' [D, D], as EDM's fid.py writes them, e.g.
    `EDM_IMAGENET64_REF_URL`. URLs are downloaded once (see `local_file`)."""
    path = local_file(path_or_url, cache_dir)
    try:
        npz = np.load(path)  # allow_pickle=False: statistics are plain arrays
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not an .npz file of FID statistics ({e})") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} is a single array, not an .npz file of FID statistics with 'mu' and 'sigma'")
    with npz:
        missing = {"mu", "sigma"} - set(npz.files)
        require(not missing, f"{path} lacks {sorted(missing)}; found {npz.files}. Expected EDM's reference "
                f"statistics, np.savez(path, mu=mu, sigma=sigma)")
        mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} must be [D] and [D, D]")
    return mu, sigma


def reference_for(path_or_url: str, extractor: Callable[[torch.Tensor], torch.Tensor], channels: int,
                  resolution: int, device: torch.device | str) -> tuple[np.ndarray, np.ndarray]:
    """Reference statistics that match `extractor`'s feature dimension (checked on two blank images)."""
    mu, sigma = load_reference_statistics(path_or_url)
    dim = extractor(torch.zeros(2, channels, resolution, resolution, dtype=torch.uint8, device=device)).shape[1]
    require(dim == len(mu), f"--ref {path_or_url}: statistics of {len(mu)}-d features, but the detector gives {dim}-d "
            f"ones (EDM's Inception: 2048)")
    return mu, sigma


def pickle_setup(teacher: str, data: str, ref: str | None, resolution: int, label_dim: int, device: torch.device,
                 timings: dict) -> dict:
    """An EDM pickle's teacher (checked against the data), the dataset (EDM's format; labels if it has them) and,
    with `ref`, Inception features and the reference statistics, checked to match now rather than at the first
    evaluation hours later."""
    import time

    from support.data import ImageDataset
    from support.edm import check_teacher, edm_teacher

    t = time.time()
    net, images = edm_teacher(teacher), ImageDataset(data, resolution=resolution, use_labels=None)
    check_teacher(net, resolution, images.num_channels, label_dim, images.num_classes)
    timings["teacher_s"] = round(time.time() - t, 1)
    extractor = stats = None
    if ref:
        inception = inception_extractor(device)
        extractor = lambda im: ({"inception": inception(im)}, None)  # noqa: E731
        stats = reference_for(ref, inception, images.num_channels, resolution, device)
    return dict(teacher=net.eval().to(device), real=images, channels=images.num_channels, extractor=extractor,
                ref=stats, label_dim=label_dim)


def fid_from_statistics(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64, by clean-fid's
    `frechet_distance` (EDM's fid.py computes the same; clean-fid also guards against a singular product)."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, np.float64) for a in (mu1, sigma1, mu2, sigma2))
    d = len(mu1) if mu1.ndim == 1 else -1
    if d < 0 or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"statistics do not match: mu1 {mu1.shape}, sigma1 {sigma1.shape}, mu2 {mu2.shape}, "
                         f"sigma2 {sigma2.shape}")
    from cleanfid.fid import frechet_distance

    return float(frechet_distance(mu1, sigma1, mu2, sigma2))


def kid(feats1: np.ndarray, feats2: np.ndarray, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """(mean, standard deviation) of the kernel inception distance (Binkowski et al. 2018) over `subsets` random
    subsets of min(subset_size, N1, N2) samples of each set: the unbiased MMD^2 with the cubic polynomial kernel.
    Unlike the Frechet distance it has no sample-size bias: two samples of one distribution score 0 on average,
    at any size. Each subset's value is clean-fid's `kernel_distance(feats1, feats2, 1, subset_size)` with numpy's
    generator seeded with `seed` (the same draws, from a private generator), computed in float64 torch ops,
    3x faster than its numpy `** 3` (tests/test_metrics.py checks them equal)."""
    f1, f2 = (torch.from_numpy(np.array(f, np.float64)) for f in (feats1, feats2))
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2), subset_size) < 2:
        raise ValueError(f"KID needs two sets of >= 2 feature vectors of one dimension and subsets of >= 2, got "
                         f"{tuple(f1.shape)}, {tuple(f2.shape)} and {subset_size}")
    rng, d, m = np.random.RandomState(seed), f1.shape[1], min(subset_size, len(f1), len(f2))

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # (a.b / d + 1)^3
        return torch.addmm(torch.ones((), dtype=torch.float64), a, b.T, alpha=1 / d).pow_(3)

    values = []
    for _ in range(subsets):
        x = f2[rng.choice(len(f2), m, replace=False)]  # clean-fid's order: the second set's subset first
        y = f1[rng.choice(len(f1), m, replace=False)]
        kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
        same = kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()
        values.append(float((same / (m - 1) - 2 * kxy.sum() / m) / m))
    return float(np.mean(values)), float(np.std(values))


# ----------------------------------------------------------------------------------------------------
# Statistics of generated samples.


@torch.no_grad()
def generated_stats(sample_fn, shape: tuple[int, ...], n: int, batch: int, label_dim: int, extractor, seed: int,
                    device, rank: int = 0, world: int = 1, keep: bool = False) -> tuple[MeanCov | dict, float, list]:
    """Feature statistics of n generated samples (split over ranks) and, when the extractor also returns
    logits, their accuracy against the labels asked for and the frequencies of the classes the logits give (else
    0 and []). sample_fn(z, labels) -> images in [-1, 1], which are
    quantised as saved PNGs would be (`images_to_uint8`) before feature extraction. extractor(images) ->
    (features, logits or None); features a [B, D] tensor, or a dict of them (one per feature space), and the
    statistics are then a dict of `MeanCov` too. `keep`: also keep the features (on every rank; for KID).
    label_dim 0: unconditional (labels are all 0, accuracy 0)."""
    stats, correct, counts, gen = None, torch.zeros((), device=device), 0, torch.Generator(device)
    per_rank = math.ceil(n / world)
    count = min(per_rank, n - rank * per_rank)
    gen.manual_seed(stream_seed(seed, "eval", rank))
    for i in range(0, count, batch):
        b = min(batch, count - i)
        labels = torch.randint(0, max(label_dim, 1), (b,), generator=gen, device=device)
        images = images_to_uint8(sample_fn(torch.randn(b, *shape, generator=gen, device=device), labels).float())
        feats, logits = extractor(images)
        feats = feats if isinstance(feats, dict) else {"": feats}
        stats = stats or {k: MeanCov(keep) for k in feats}
        for k, f in feats.items():
            stats[k].update(f)
        if logits is not None:
            correct += (logits.argmax(1) == labels).sum()
            counts = counts + torch.bincount(logits.argmax(1), minlength=logits.shape[1])
    if dist.is_initialized():  # merge every rank's (n, mean, m2) (and features)
        for k in stats:
            parts = [None] * world
            dist.all_gather_object(parts, (stats[k].n, stats[k].mean.cpu(), stats[k].m2.cpu(), stats[k].kept))
            stats[k] = MeanCov(keep)
            for n_, mean, m2, kept in parts:
                stats[k].merge(n_, mean, m2)
                stats[k].kept = stats[k].kept + kept if keep else None
        dist.all_reduce(correct)
        if isinstance(counts, torch.Tensor):
            dist.all_reduce(counts)
    classes = (counts / n).tolist() if isinstance(counts, torch.Tensor) else []
    return (stats[""] if "" in stats else stats), correct.item() / n, classes


# ----------------------------------------------------------------------------------------------------
# Text-to-image (App. G): clean-fid FID on centre-cropped, resized images (256 px for SD v1.5, Table 5; 512 px for
# SDXL, Table 2), patch FID on 299 px centre crops of the full-resolution images, CLIP score with OpenCLIP.


def _centre(img: np.ndarray, s: int) -> np.ndarray:
    h, w = img.shape[:2]
    return img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


def centre_crop_resize(size: int | None) -> Callable[[np.ndarray], np.ndarray]:
    """The long edge centre-cropped to a square, then LANCZOS-resized to `size` (clean-fid's image hook)."""
    from PIL import Image

    def f(img: np.ndarray) -> np.ndarray:
        img = _centre(img, min(img.shape[:2]))
        return np.asarray(Image.fromarray(img).resize((size, size), Image.LANCZOS)) if size else img

    return f


def centre_patch(size: int = 299) -> Callable[[np.ndarray], np.ndarray]:
    return lambda img: _centre(img, size)


def folder_fid(generated: str | Path, reference: str | Path, transform: Callable, device: torch.device,
               batch: int) -> float:
    """clean-fid's FID ("clean" mode, its Inception-v3 in fp32) between two image folders, each image passed
    through `transform` first."""
    from cleanfid import fid

    with torch.autocast(device.type, enabled=False):
        return float(fid.compute_fid(str(generated), str(reference), mode="clean", device=device, num_workers=0,
                                     batch_size=batch, verbose=False, use_dataparallel=False,
                                     custom_image_tranform=transform))


def load_clip(name: str = "ViT-g-14", pretrained: str = "laion2b_s12b_b42k", device: torch.device | str = "cpu"):
    """(model, image preprocess, tokenizer) from open_clip (the paper: ViT-g-14)."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def clip_score(folder: Path, prompts: list[str], clip: tuple, device: torch.device, batch: int) -> float:
    """Mean cosine similarity of image and prompt embeddings (the paper's 0.33 scale) of folder/00000.png, ...,
    with clip = load_clip(...)."""
    from PIL import Image

    model, preprocess, tokenizer = clip
    crop, scores = centre_crop_resize(256), []
    for b in range(0, len(prompts), batch):
        idx = range(b, min(b + batch, len(prompts)))
        imgs = torch.stack([preprocess(Image.fromarray(crop(np.asarray(Image.open(folder / f"{i:05d}.png")
                                                                       .convert("RGB"))))) for i in idx]).to(device)
        fi = torch.nn.functional.normalize(model.encode_image(imgs).float(), dim=-1)
        ft = torch.nn.functional.normalize(model.encode_text(tokenizer([prompts[i] for i in idx]).to(device))
                                           .float(), dim=-1)
        scores.append((fi * ft).sum(-1).cpu())
    return torch.cat(scores).mean().item()
