"""FID, Inception Score and KID of a generator, computed by torch-fidelity on features from all ranks.

- The maths is torch-fidelity's (`fid_statistics_to_metric`, `isc_features_to_metric`,
  `kid_features_to_metric`), with its default settings (10 IS splits, KID's cubic kernel, seed 2020).
  We call those functions on gathered features rather than `torch_fidelity.calculate_metrics`,
  because that runs the whole evaluation in one process.
- Feature extractors come from torch-fidelity's registry: `inception-v3-compat` (the TF-FID
  InceptionV3, the standard) by default, or `module:Class` of a `FeatureExtractorBase` subclass,
  registered on first use (the tests use a small stand-in this way), or `cifar10-classifier`
  (trainer/classifier_features.py), an offline CIFAR-10 classifier for machines without the weights.
- Generated images are quantized to uint8 exactly like real data before their features are taken.
- Distributed: the `eval.num_samples` latents are cut into batches of `eval.batch_size`; rank r
  takes batches r, r + W, ... Latent i depends only on (eval.seed, i) and each batch is the same on
  any number of processes, so the gathered features, put back in sample order, are those of a
  one-process evaluation of the same latents.
- Real-image statistics (FID mean and covariance, KID features) are computed once per (dataset,
  split, resolution, feature extractor) and cached in `eval.cache_dir` with an atomic write.
"""

from __future__ import annotations

from trainer import _torchvision_compat  # noqa: F401  (must precede torchvision: see that module)

# isort: split

import hashlib
import importlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from trainer.classifier_features import NAME as CLASSIFIER  # importing registers it with torch-fidelity
from trainer.classifier_features import classifier_weights
from trainer.config import Config, user_cache_dir
from trainer.data import CIFAR10Images, build_dataset, pil_to_uint8
from trainer.errors import EvaluationError, UserError
from trainer.models import Generator

INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # the name torch-fidelity downloads it under
INCEPTION_SHA256_PREFIX = "6726825d"
CACHE_FORMAT = 1
BN_STATS = ("running", "batch")  # how a generator's BatchNorm normalises when sampled: see generated_features


@dataclass(frozen=True)
class Layers:
    """Which output of the feature extractor each metric reads (the extractor's own defaults)."""

    fid: str
    isc: str
    kid: str

    def unique(self) -> list[str]:
        return list(dict.fromkeys([self.fid, self.isc, self.kid]))


@dataclass
class Reference:
    """Real-image statistics: FID's mean and covariance, and the features KID draws subsets from."""

    mu: np.ndarray
    sigma: np.ndarray
    kid_features: torch.Tensor
    path: Path


# ---- latents, quantization and sharding --------------------------------------------------------
def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Generated float [-1, 1] -> uint8 [0, 255], quantized like real data (the inverse of the loader's scaling).

    Rounds half up, as torchvision's `save_image` does, so a saved PNG holds exactly these values.
    """
    return images.float().add(1.0).mul_(127.5).add_(0.5).clamp_(0, 255).to(torch.uint8)


def latents(seed: int, indices: Sequence[int], nz: int) -> torch.Tensor:
    """Latent vector i depends only on (seed, i): the same for any batch size or number of processes.

    numpy's generator seeded with the pair [seed, i] (SeedSequence mixes both fully); torch's CPU
    generator would keep only 32 bits of a combined seed, so different seeds could share latents.
    """
    rows = [np.random.default_rng([seed, i]).standard_normal(nz, dtype=np.float32) for i in indices]
    return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, nz)


def rank_batches(total: int, batch_size: int, rank: int, world: int) -> list[range]:
    """Batches r, r + world, ... of the `total` samples cut into batches of `batch_size`.

    Whole batches, not samples, are dealt out: a batch then has the same contents on any number
    of processes, and a network's output for it is bit-identical (batch size can change kernels).
    """
    return [range(s, min(s + batch_size, total)) for s in range(rank * batch_size, total, world * batch_size)]


def gather_in_order(
    accelerator: Accelerator, indices: list[int], features: dict[str, torch.Tensor], dims: dict[str, int]
) -> dict[str, torch.Tensor]:
    """Every rank's features, in sample-index order, on the CPU of every rank.

    `accelerator.gather` needs equal shapes: each rank pads to the largest share, and padding rows
    carry index -1 so they can be dropped.
    """
    device = accelerator.device
    count = torch.tensor([len(indices)], device=device)
    most = int(accelerator.gather(count).max())
    pad = most - len(indices)
    index = torch.tensor(list(indices) + [-1] * pad, dtype=torch.long, device=device)
    all_index = accelerator.gather(index)
    keep = (all_index >= 0).nonzero().squeeze(1)
    order = keep[all_index[keep].argsort()]
    out = {}
    for name, dim in dims.items():
        local = features.get(name, torch.empty(0, dim, device=device)).to(device=device, dtype=torch.float32)
        padded = torch.cat([local, local.new_zeros(pad, dim)])
        out[name] = accelerator.gather(padded)[order].cpu()
    return out


# ---- feature extractors ------------------------------------------------------------------------
def _registered(spec: str) -> type:
    """The torch-fidelity extractor class for a registry name or `module:Class` (registered here)."""
    from torch_fidelity import FeatureExtractorBase, register_feature_extractor
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if spec in FEATURE_EXTRACTORS_REGISTRY:
        return FEATURE_EXTRACTORS_REGISTRY[spec]
    if ":" not in spec:
        raise EvaluationError(
            f"eval.feature_extractor={spec!r} is not a torch-fidelity extractor "
            f"({', '.join(sorted(FEATURE_EXTRACTORS_REGISTRY))}) nor module:Class; e.g. {INCEPTION}"
        )
    module_name, _, class_name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise EvaluationError(
            f"eval.feature_extractor={spec!r} cannot be imported ({exc}); check module:Class"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, FeatureExtractorBase)):
        raise EvaluationError(f"eval.feature_extractor={spec!r} is not a torch_fidelity.FeatureExtractorBase subclass")
    register_feature_extractor(spec, cls)
    return cls


def layers_for(spec: str) -> Layers:
    cls = _registered(spec)
    return Layers(*(cls.get_default_feature_layer_for_metric(m) for m in ("fid", "isc", "kid")))


def inception_weights(configured: str | None) -> Path:
    """The InceptionV3 weights file: `eval.feature_extractor_weights`, else torch hub's cache, else a download."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    hub_file = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    fix = (
        f"download {URL_INCEPTION_V3} (on any machine with internet) and either put it at {hub_file} "
        f"or set eval.feature_extractor_weights=<path to {INCEPTION_FILE}>"
    )
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise EvaluationError(f"eval.feature_extractor_weights={configured!r} is not a file; {fix}")
        return path
    if hub_file.is_file():
        return hub_file
    try:
        hub_file.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(URL_INCEPTION_V3, str(hub_file), INCEPTION_SHA256_PREFIX, progress=False)
    except Exception as exc:  # URLError, HTTPError, OSError, RuntimeError (hash mismatch)
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise EvaluationError(
            f"the InceptionV3 weights for FID/IS/KID are not here and cannot be downloaded ({reason}); {fix}"
        ) from None
    return hub_file


@contextmanager
def _weights_only_loads() -> Iterator[None]:
    """torch-fidelity loads a weights file with `torch.load(weights_only=False)`, i.e. pickle, which
    can run code; torch's documented switch makes that load refuse anything but tensors."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def load_feature_extractor(spec: str, weights: str | None) -> tuple[nn.Module, Path | None]:
    """(extractor on the CPU in eval mode, its weights file or None). Raises EvaluationError."""
    from torch_fidelity.utils import create_feature_extractor

    _registered(spec)
    # Extractors whose weights file has a default location (and a message on how to get it when missing).
    default_weights = {INCEPTION: inception_weights, CLASSIFIER: classifier_weights}.get(spec)
    path = default_weights(weights) if default_weights else (Path(weights).expanduser() if weights else None)
    if path is not None and not path.is_file():
        raise EvaluationError(f"eval.feature_extractor_weights={weights!r} is not a file")
    kwargs = {"feature_extractor_weights_path": str(path)} if path is not None else {}
    try:
        # fork_rng: building the network draws its initial weights; the training RNG stays untouched
        with torch.random.fork_rng(devices=[]), _weights_only_loads():
            extractor = create_feature_extractor(spec, layers_for(spec).unique(), cuda=False, verbose=False, **kwargs)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
        where = f" from {path}" if path else ""
        raise EvaluationError(
            f"cannot build feature extractor {spec!r}{where} ({reason}); a damaged or wrong weights file? "
            "Fetch it again (see the README, Evaluate)"
        ) from None
    return extractor, path


@torch.no_grad()
def extract(extractor: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Features of uint8 images, in full precision whatever autocast the caller is under."""
    with torch.autocast(images.device.type, enabled=False):
        return extractor.convert_features_tuple_to_dict(extractor(images))


# ---- the library's maths -----------------------------------------------------------------------
def fid_statistics(features: torch.Tensor) -> dict[str, np.ndarray]:
    from torch_fidelity.metric_fid import fid_features_to_statistics

    return fid_features_to_statistics(features.float().cpu())


def compute_metrics(
    reference: Reference,
    generated: dict[str, torch.Tensor],
    layers: Layers,
    kid_subsets: int,
    kid_subset_size: int,
) -> dict[str, float]:
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    fid = fid_statistics_to_metric(
        {"mu": reference.mu, "sigma": reference.sigma}, fid_statistics(generated[layers.fid]), verbose=False
    )
    isc = isc_features_to_metric(generated[layers.isc])  # torch-fidelity's defaults: 10 splits, seed 2020
    subset = min(kid_subset_size, len(reference.kid_features), len(generated[layers.kid]))
    kid = kid_features_to_metric(
        reference.kid_features, generated[layers.kid], kid_subsets=kid_subsets, kid_subset_size=subset, verbose=False
    )
    return {
        "fid": float(fid[KEY_METRIC_FID]),
        "is_mean": float(isc[KEY_METRIC_ISC_MEAN]),
        "is_std": float(isc[KEY_METRIC_ISC_STD]),
        "kid_mean": float(kid[KEY_METRIC_KID_MEAN]),
        "kid_std": float(kid[KEY_METRIC_KID_STD]),
        "kid_subset_size": subset,
    }


# ---- reference statistics: identity, dataset, cache --------------------------------------------
def reference_identity(cfg: Config, weights: Path | None) -> dict[str, Any]:
    """Everything the real-image statistics depend on; its hash names the cache file."""
    data = cfg.data
    identity: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "source": data.source,
        "split": cfg.eval.split,
        "resolution": cfg.model.resolution,
        "num_real": cfg.eval.num_real,
        "feature_extractor": cfg.eval.feature_extractor,
        "weights": weights.name if weights else None,
        "layers": vars(layers_for(cfg.eval.feature_extractor)),
    }
    if data.source == "fake":
        identity.update(fake_size=data.fake_size, seed=cfg.run.seed)
    else:
        identity["root"] = str(Path(data.root).resolve())
    if data.source == "folder" and Path(data.root).is_dir():
        # A folder can change in place: its listing (names and sizes) is part of the identity.
        digest = hashlib.sha256()
        for path in sorted(p for p in Path(data.root).rglob("*") if p.is_file()):
            digest.update(f"{path.relative_to(data.root)}\0{path.stat().st_size}\n".encode())
        identity["listing"] = digest.hexdigest()[:16]
    return identity


def reference_path(cfg: Config, identity: dict[str, Any]) -> Path:
    cache_dir = Path(cfg.eval.cache_dir).expanduser() if cfg.eval.cache_dir else user_cache_dir("reference-stats")
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    extractor = "".join(c if c.isalnum() or c in "-_" else "_" for c in cfg.eval.feature_extractor)[-40:]
    return cache_dir / f"{identity['source']}-{identity['split']}-{identity['resolution']}px-{extractor}-{digest}.npz"


def reference_dataset(cfg: Config) -> Dataset:
    """The real images to compare with, at the model's resolution, as uint8 like the training data."""
    if cfg.eval.split == "test":  # validated: cifar10 only
        return CIFAR10Images(cfg.data.root, cfg.data.download, pil_to_uint8(cfg.model.resolution), train=False)
    dataset = build_dataset(cfg.data, cfg.model.resolution, cfg.run.seed)
    if cfg.eval.num_real is not None and cfg.eval.num_real < len(dataset):
        # A seeded random subset: the first files of a sorted folder would all be one class.
        picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[: cfg.eval.num_real]
        dataset = Subset(dataset, sorted(picks.tolist()))
    return dataset


def save_reference(path: Path, stats: dict[str, np.ndarray], kid_features: torch.Tensor, identity: dict) -> None:
    """Atomic: written to a temporary file in the same directory, fsynced, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        with open(tmp, "wb") as fh:
            np.savez(
                fh,
                mu=stats["mu"],
                sigma=stats["sigma"],
                kid_features=kid_features.numpy(),
                identity=np.array(json.dumps(identity, sort_keys=True)),
            )
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_reference(path: Path, identity: dict) -> Reference | None:
    """The cached statistics, or None if the file is unreadable or belongs to something else."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if json.loads(str(data["identity"])) != json.loads(json.dumps(identity, sort_keys=True)):
                return None
            return Reference(data["mu"], data["sigma"], torch.from_numpy(data["kid_features"]), path)
    except (OSError, ValueError, KeyError):
        return None


# ---- the evaluator -----------------------------------------------------------------------------
def _main_first(accelerator: Accelerator, fn: Callable[[], Any]) -> Any:
    """Run `fn` on the main process, then on the others; an error on the main process is raised on
    every rank (rather than leaving the others waiting for it forever)."""
    result, failure = None, [None]
    if accelerator.is_main_process:
        try:
            result = fn()
        except UserError as exc:
            failure[0] = exc
    if accelerator.num_processes > 1:
        broadcast_object_list(failure)
    if failure[0] is not None:
        raise failure[0]
    return result if accelerator.is_main_process else fn()


class Evaluator:
    """FID / IS / KID of a generator's weights. Collective: every rank builds it and calls `evaluate`.

    Building it loads the feature extractor, so missing weights stop a run before it trains.
    """

    def __init__(self, cfg: Config, accelerator: Accelerator, log: Callable[[str], None] = print) -> None:
        self.cfg, self.acc, self.log = cfg, accelerator, log
        ev = cfg.eval
        self.layers = layers_for(ev.feature_extractor)
        extractor, self.weights = _main_first(
            accelerator, lambda: load_feature_extractor(ev.feature_extractor, ev.feature_extractor_weights)
        )
        self.extractor = extractor.to(accelerator.device)
        # A private full-precision generator: the one being trained may run under autocast (Accelerate
        # patches its forward), and evaluations during training and afterwards must see the same maths.
        model = cfg.model
        self.generator = Generator(model.nz, model.ngf, model.resolution).to(accelerator.device).eval()
        probe = torch.zeros(1, 3, model.resolution, model.resolution, dtype=torch.uint8, device=accelerator.device)
        self.dims = {name: f.shape[1] for name, f in extract(self.extractor, probe).items()}
        self._reference: Reference | None = None
        self._reference_ready = False

    # -- real images
    def reference(self) -> Reference | None:
        """Loads or computes (and caches) the real-image statistics. Collective; the main process gets them."""
        if self._reference_ready:
            return self._reference
        cfg, acc = self.cfg, self.acc
        identity = reference_identity(cfg, self.weights) if acc.is_main_process else None
        path = reference_path(cfg, identity) if acc.is_main_process else None
        found = [load_reference(path, identity) if acc.is_main_process and path.is_file() else None]
        hit = [found[0] is not None]
        if acc.num_processes > 1:
            broadcast_object_list(hit)
        if hit[0]:
            self._reference = found[0]
            if acc.is_main_process:
                self.log(f"reference statistics: loaded {path}")
        else:
            start = time.perf_counter()
            dataset = _main_first(acc, lambda: reference_dataset(cfg))
            features = self._real_features(dataset)
            if acc.is_main_process:
                stats = fid_statistics(features[self.layers.fid])
                save_reference(path, stats, features[self.layers.kid], identity)
                self._reference = Reference(stats["mu"], stats["sigma"], features[self.layers.kid], path)
                self.log(
                    f"reference statistics: {len(dataset)} real images in {time.perf_counter() - start:.0f}s, "
                    f"saved {path}"
                )
        self._reference_ready = True
        return self._reference

    def _real_features(self, dataset: Dataset) -> dict[str, torch.Tensor]:
        acc, batch = self.acc, self.cfg.eval.batch_size
        mine = rank_batches(len(dataset), batch, acc.process_index, acc.num_processes)
        indices = [i for r in mine for i in r]
        # Each of this rank's batches is full except possibly the very last of all, so batch_size-sized
        # chunks of its index list are exactly its batches.
        loader = DataLoader(Subset(dataset, indices), batch_size=batch, num_workers=self.cfg.data.num_workers)
        parts: dict[str, list[torch.Tensor]] = {}
        for images in loader:
            for name, f in extract(self.extractor, images.to(acc.device)).items():
                parts.setdefault(name, []).append(f)
        local = {name: torch.cat(fs) for name, fs in parts.items()}
        return gather_in_order(acc, indices, local, self.dims)

    # -- generated images
    @torch.no_grad()
    def generated_features(self, weights: nn.Module, bn_stats: str = "running") -> dict[str, torch.Tensor]:
        """Features of `eval.num_samples` images from `weights` (an unwrapped generator), gathered in order.

        bn_stats: `running` (eval mode) or `batch` (train mode: each batch of eval.batch_size latents
        normalised by its own statistics, as the classic loop's grids are). Only the private copy's
        running statistics change, and it is reloaded from `weights` every time.
        """
        if bn_stats not in BN_STATS:
            raise EvaluationError(f"bn_stats={bn_stats!r} is not one of {', '.join(BN_STATS)}")
        acc, ev, g = self.acc, self.cfg.eval, self.generator
        g.load_state_dict(weights.state_dict())
        g.train(bn_stats == "batch")
        mine = rank_batches(ev.num_samples, ev.batch_size, acc.process_index, acc.num_processes)
        parts: dict[str, list[torch.Tensor]] = {}
        with torch.autocast(acc.device.type, enabled=False):
            for batch in mine:
                z = latents(ev.seed, batch, self.cfg.model.nz).to(acc.device)
                for name, f in extract(self.extractor, to_uint8(g(z))).items():
                    parts.setdefault(name, []).append(f)
        local = {name: torch.cat(fs) for name, fs in parts.items()}
        return gather_in_order(acc, [i for r in mine for i in r], local, self.dims)

    def evaluate(self, weights: nn.Module, bn_stats: str = "running") -> dict[str, float]:
        """FID, IS and KID of `weights`, the same on every rank. Collective. `bn_stats`: see generated_features."""
        start = time.perf_counter()
        reference = self.reference()
        generated = self.generated_features(weights, bn_stats)
        results: list[Any] = [None]
        if self.acc.is_main_process:
            ev = self.cfg.eval
            results[0] = compute_metrics(reference, generated, self.layers, ev.kid_subsets, ev.kid_subset_size)
            results[0].update(num_samples=ev.num_samples, num_real=len(reference.kid_features))
        if self.acc.num_processes > 1:
            broadcast_object_list(results)
        return {**results[0], "eval_s": time.perf_counter() - start}
