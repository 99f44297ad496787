"""FID, Inception Score and KID of a generator, computed by torch-fidelity on features from all ranks.

- The maths is torch-fidelity's (`fid_statistics_to_metric`, `isc_features_to_metric`,
  `kid_features_to_metric`), with its default settings (10 IS splits, KID's cubic kernel, seed 2020).
  We call those functions on gathered features rather than `torch_fidelity.calculate_metrics`,
  because that runs the whole evaluation in one process.
- Feature extractors come from torch-fidelity's registry: `inception-v3-compat` (the TF-FID
  InceptionV3, the standard) by default, or `module:Class` of a `FeatureExtractorBase` subclass,
  registered on first use (the tests use a small stand-in this way), or `cifar10-classifier`
  (trainer/quality/classifier.py), an offline CIFAR-10 classifier for machines without the weights.
- Generated images are quantized to uint8 exactly like real data before their features are taken.
- Distributed: the `eval.num_samples` latents are cut into batches of `eval.batch_size`; rank r
  takes batches r, r + W, ... Latent i depends only on (eval.seed, i) and each batch is the same on
  any number of processes, so the gathered features, put back in sample order, are those of a
  one-process evaluation of the same latents.
- Real-image statistics (FID mean and covariance, KID features) are computed once per (dataset,
  split, resolution, feature extractor) and cached in `eval.cache_dir` with an atomic write.
"""

from __future__ import annotations

import argparse
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
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from trainer.core.config import Config
from trainer.core.data import SOURCES, build_dataset, to_uint8
from trainer.core.models import Generator
from trainer.util.atomic import write_atomic
from trainer.util.errors import EvaluationError
from trainer.util.paths import user_cache_dir
from trainer.util.ranks import main_decides

INCEPTION = "inception-v3-compat"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # the name torch-fidelity downloads it under
INCEPTION_SHA256_PREFIX = "6726825d"
CACHE_FORMAT = 1
BN_STATS = ("running", "batch")  # how a generator's BatchNorm normalises when sampled: see generated_features


def add_bn_stats_argument(parser: argparse.ArgumentParser) -> None:
    """`--bn-stats running|batch` of trainer.evaluate and trainer.sample."""
    parser.add_argument(
        "--bn-stats",
        choices=BN_STATS,
        default="running",
        help="BatchNorm in G: running statistics (eval mode, default), or each batch's own statistics "
        "(train mode, as the classic loop's grids; the stored running statistics are left untouched)",
    )


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


def _gather_to_main(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor | None:
    """Every rank's equally shaped `tensor`, concatenated in rank order on the main process (None elsewhere)."""
    if accelerator.num_processes == 1:
        return tensor
    parts = (
        [torch.empty_like(tensor) for _ in range(accelerator.num_processes)] if accelerator.is_main_process else None
    )
    torch.distributed.gather(tensor, parts, dst=0)
    return torch.cat(parts) if parts is not None else None


def gather_in_order(
    accelerator: Accelerator, indices: list[int], features: dict[str, torch.Tensor], dims: dict[str, int]
) -> dict[str, torch.Tensor] | None:
    """Every rank's features, in sample-index order, on the CPU of the main process (None on the others:
    only it computes the metrics, and 8 copies of 50k feature rows would be memory spent for nothing).

    A gather needs equal shapes: each rank pads to the largest share, and padding rows carry index
    -1 so they can be dropped.
    """
    device = accelerator.device
    count = torch.tensor([len(indices)], device=device)
    most = int(accelerator.gather(count).max())
    pad = most - len(indices)
    index = torch.tensor(list(indices) + [-1] * pad, dtype=torch.long, device=device)
    all_index = _gather_to_main(accelerator, index)
    order = None
    if all_index is not None:
        keep = (all_index >= 0).nonzero().squeeze(1)
        order = keep[all_index[keep].argsort()]
    out = {}
    for name, dim in dims.items():
        local = features.get(name, torch.empty(0, dim, device=device)).to(device=device, dtype=torch.float32)
        gathered = _gather_to_main(accelerator, torch.cat([local, local.new_zeros(pad, dim)]))
        if gathered is not None:
            out[name] = gathered[order].cpu()
    return out if accelerator.is_main_process else None


# ---- feature extractors ------------------------------------------------------------------------
# Extractors of this package, imported (and so registered with torch-fidelity) on first use only: the
# trainer runs without torch-fidelity until it evaluates.
OUR_EXTRACTORS = {"cifar10-classifier": "trainer.quality.classifier"}


def score_label(feature_extractor: str, short: bool = False) -> str:
    """What the IS columns measured: the Inception Score with an InceptionV3, else a classifier score (the
    same formula on another classifier's logits, e.g. cifar10-classifier's: not comparable with published IS)."""
    if feature_extractor.startswith("inception"):
        return "IS" if short else "Inception Score"
    return "classifier score"


def _registered(spec: str) -> type:
    """The torch-fidelity extractor class for a registry name or `module:Class` (registered here)."""
    from torch_fidelity import FeatureExtractorBase, register_feature_extractor
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    if spec in OUR_EXTRACTORS and spec not in FEATURE_EXTRACTORS_REGISTRY:
        importlib.import_module(OUR_EXTRACTORS[spec])  # registers itself
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


def resolve_weights(spec: str, weights: str | None) -> Path | None:
    """The extractor's weights file (downloading InceptionV3's if needed), or None for an extractor
    that brings its own. Decided once, on one process, and handed to the others: another node must
    not start a download of its own. Raises EvaluationError."""
    cls = _registered(spec)
    # InceptionV3's file is downloaded; an extractor of ours may know its own default file (and what to
    # say when it is missing): trainer.quality.classifier's `default_weights`.
    default_weights = inception_weights if spec == INCEPTION else getattr(cls, "default_weights", None)
    path = default_weights(weights) if default_weights else (Path(weights).expanduser() if weights else None)
    if path is not None and not path.is_file():
        raise EvaluationError(f"eval.feature_extractor_weights={weights!r} is not a file")
    return path


def load_feature_extractor(spec: str, path: Path | None) -> nn.Module:
    """The extractor on the CPU in eval mode, from the weights file `resolve_weights` found. Raises EvaluationError."""
    from torch_fidelity.utils import create_feature_extractor

    if path is not None and not path.is_file():
        raise EvaluationError(
            f"the feature extractor's weights {path} are not on this node; put them on a filesystem every "
            "node sees and set eval.feature_extractor_weights to that path"
        )
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
            "Fetch it again (docs/evaluation.md)"
        ) from None
    return extractor


@contextmanager
def _full_fp32() -> Iterator[None]:
    """No TF32 in matmuls and convolutions: cuDNN allows it by default, and the extractor's features
    (and so FID) would then depend on the GPU. Restored afterwards: training may want TF32."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@torch.no_grad()
def extract(extractor: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Features of uint8 images, in full precision (no autocast, no TF32) whatever the caller is under."""
    with torch.autocast(images.device.type, enabled=False), _full_fp32():
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
def reference_identity(cfg: Config, weights: Path | None, device: torch.device) -> dict[str, Any]:
    """Everything the real-image statistics depend on; its hash names the cache file.

    The device type is part of it: CPU and GPU kernels give slightly different features.
    """
    data = cfg.data
    identity: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "device": torch.device(device).type,
        "source": data.source,
        "split": cfg.eval.split,
        "resolution": cfg.model.resolution,
        "num_real": cfg.eval.num_real,
        "feature_extractor": cfg.eval.feature_extractor,
        "weights": weights.name if weights else None,
        "layers": vars(layers_for(cfg.eval.feature_extractor)),
        **SOURCES[data.source].identity(data, cfg.run.seed),  # where the images are; a folder's listing
    }
    return identity


def reference_path(cfg: Config, identity: dict[str, Any]) -> Path:
    cache_dir = Path(cfg.eval.cache_dir).expanduser() if cfg.eval.cache_dir else user_cache_dir("reference-stats")
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    extractor = "".join(c if c.isalnum() or c in "-_" else "_" for c in cfg.eval.feature_extractor)[-40:]
    return cache_dir / f"{identity['source']}-{identity['split']}-{identity['resolution']}px-{extractor}-{digest}.npz"


def reference_dataset(cfg: Config) -> Dataset:
    """The real images to compare with, at the model's resolution, as uint8 like the training data."""
    if cfg.eval.split == "test":  # validated: the source has a test set
        return SOURCES[cfg.data.source].test_set(cfg.data, cfg.model.resolution)
    dataset = build_dataset(cfg.data, cfg.model.resolution, cfg.run.seed)
    if cfg.eval.num_real is not None and cfg.eval.num_real < len(dataset):
        # A seeded random subset: the first files of a sorted folder would all be one class.
        picks = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[: cfg.eval.num_real]
        dataset = Subset(dataset, sorted(picks.tolist()))
    return dataset


def save_reference(path: Path, stats: dict[str, np.ndarray], kid_features: torch.Tensor, identity: dict) -> None:
    """Atomic (trainer.util.atomic), so a reader never sees half a file."""
    arrays = {
        "mu": stats["mu"],
        "sigma": stats["sigma"],
        "kid_features": kid_features.numpy(),
        "identity": np.array(json.dumps(identity, sort_keys=True)),
    }

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    write_atomic(path, write)


def load_reference(path: Path, identity: dict) -> Reference | None:
    """The cached statistics, or None if the file is unreadable or belongs to something else."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if json.loads(str(data["identity"])) != json.loads(json.dumps(identity, sort_keys=True)):
                return None
            return Reference(data["mu"], data["sigma"], torch.from_numpy(data["kid_features"]), path)
    except (OSError, ValueError, KeyError):
        return None


@torch.no_grad()
def reference_statistics(
    cfg: Config, extractor: nn.Module, weights: Path | None, device: torch.device, log: Callable[[str], None] = print
) -> Reference:
    """The real-image statistics for `cfg`: from the cache, or computed on `device` in this one process and cached.

    One-time work of minutes on a large dataset: `trainer.prepare` does it before training starts,
    where no collective waits for it.
    """
    identity = reference_identity(cfg, weights, device)
    path = reference_path(cfg, identity)
    found = load_reference(path, identity) if path.is_file() else None
    if found is not None:
        log(f"reference statistics: loaded {path}")
        return found
    start = time.perf_counter()
    layers = layers_for(cfg.eval.feature_extractor)
    dataset = reference_dataset(cfg)
    extractor = extractor.to(device)
    parts: dict[str, list[torch.Tensor]] = {}
    for images in DataLoader(dataset, batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers):
        for name, f in extract(extractor, images.to(device)).items():
            parts.setdefault(name, []).append(f.float().cpu())
    features = {name: torch.cat(fs) for name, fs in parts.items()}
    stats = fid_statistics(features[layers.fid])
    save_reference(path, stats, features[layers.kid], identity)
    log(f"reference statistics: {len(dataset)} real images in {time.perf_counter() - start:.0f}s, saved {path}")
    return Reference(stats["mu"], stats["sigma"], features[layers.kid], path)


# ---- the evaluator -----------------------------------------------------------------------------
class Evaluator:
    """FID / IS / KID of a generator's weights. Collective: every rank builds it and calls `evaluate`.

    Building it loads the feature extractor, so missing weights stop a run before it trains.
    """

    def __init__(self, cfg: Config, accelerator: Accelerator, log: Callable[[str], None] = print) -> None:
        self.cfg, self.acc, self.log = cfg, accelerator, log
        ev = cfg.eval
        self.layers = layers_for(ev.feature_extractor)
        # The main process finds (or downloads) the weights; every rank loads that same file.
        self.weights = main_decides(
            accelerator, lambda: resolve_weights(ev.feature_extractor, ev.feature_extractor_weights)
        )
        self.extractor = load_feature_extractor(ev.feature_extractor, self.weights).to(accelerator.device)
        # A private full-precision generator: the one being trained may run under autocast (Accelerate
        # patches its forward), and evaluations during training and afterwards must see the same maths.
        model = cfg.model
        self.generator = Generator(model.nz, model.ngf, model.resolution).to(accelerator.device).eval()
        probe = torch.zeros(1, 3, model.resolution, model.resolution, dtype=torch.uint8, device=accelerator.device)
        self.dims = {name: f.shape[1] for name, f in extract(self.extractor, probe).items()}
        self._reference: Reference | None = None  # the main process's copy (the others hold none)
        self._reference_known = False  # the same on every rank: whether the collective below has run

    # -- real images
    def reference(self) -> Reference | None:
        """The real-image statistics, on the main process (None on the others). Collective the first time.

        Normally prepared before training (`trainer.prepare`), so this only loads them; otherwise the
        main process computes them here while the others wait. Whether to enter the collective is
        decided by a flag every rank sets alike, never by the main process's cache: ranks that
        decided differently would meet in different collectives at the next evaluation.
        """
        if not self._reference_known:

            def load() -> str:
                self._reference = reference_statistics(
                    self.cfg, self.extractor, self.weights, self.acc.device, self.log
                )
                return str(self._reference.path)  # only the answer travels, not megabytes of statistics

            main_decides(self.acc, load)
            self._reference_known = True
        return self._reference

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
        if acc.num_processes > 1:
            # Without SyncBatchNorm each rank's running statistics are its own: generate with rank 0's
            # everywhere, so the samples are those of the checkpoint (which holds rank 0's).
            for buffer in g.buffers():
                torch.distributed.broadcast(buffer, src=0)
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

        def score() -> dict[str, float]:
            ev = self.cfg.eval
            results = compute_metrics(reference, generated, self.layers, ev.kid_subsets, ev.kid_subset_size)
            return {**results, "num_samples": ev.num_samples, "num_real": len(reference.kid_features)}

        results = main_decides(self.acc, score)
        return {**results, "eval_s": time.perf_counter() - start}
