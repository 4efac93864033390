"""Label-free quality of a representation: RankMe, alignment and uniformity.

- ``rankme(z)`` (Garrido et al., ICML 2023, eq. 1): with sigma the singular values of the
  (N, D) embedding matrix (not centred), p_k = sigma_k / ||sigma||_1 + eps, eps = 1e-7,
  RankMe = exp(-sum_k p_k log p_k). From 1 (every embedding on one line: collapsed) to
  min(N, D).
- ``alignment(a, b)`` (Wang & Isola, ICML 2020, alpha = 2): the mean of ||f(x) - f(y)||^2
  over positive pairs (two augmented views of one image), f L2-normalised. 0 when both views
  map to the same point; at most 4.
- ``uniformity(z)`` (Wang & Isola, t = 2): log of the mean of exp(-2 ||f(x) - f(y)||^2) over
  the pairs of distinct images, f L2-normalised. 0 when every image maps to the same point
  (collapsed); lower is more uniform (about -4 at best on a high-dimensional sphere).

All three run on a fixed sample of images (``LabelFreeSample``): ``eval.labelfree_size``
images drawn with a fixed seed (the same images for every run, whatever ``trainer.seed``),
and their two views augmented with the training augmentation from a fixed generator.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive_cli.data.batches import derive_seed

log = logging.getLogger(__name__)
RANKME_EPS = 1e-7  # Garrido et al. 2023, eq. 1
UNIFORMITY_T = 2.0  # Wang & Isola 2020
SAMPLE_SEED = 0  # the label-free sample and its views: the same for every run
LABEL_FREE_METRICS = {"rankme", "alignment", "uniformity"}  # the evaluators of this module


@torch.no_grad()
def rankme(z: Tensor, eps: float = RANKME_EPS) -> float:
    """The effective rank of the (N, D) embeddings ``z`` (see the module docstring)."""
    s = torch.linalg.svdvals(z.double())
    p = s / s.sum().clamp_min(1e-300) + eps
    return float(torch.exp(-(p * p.log()).sum()))


@torch.no_grad()
def alignment(a: Tensor, b: Tensor) -> float:
    """Mean squared distance of L2-normalised positive pairs (rows of ``a`` and ``b``)."""
    a, b = F.normalize(a.double(), dim=1), F.normalize(b.double(), dim=1)
    return float((a - b).pow(2).sum(1).mean())


@torch.no_grad()
def uniformity(z: Tensor, t: float = UNIFORMITY_T) -> float:
    """log mean_{i<j} exp(-t ||f_i - f_j||^2) of the L2-normalised rows of ``z``."""
    f = F.normalize(z.double(), dim=1)
    sq = (2 - 2 * f @ f.T).clamp_min(0)  # ||a - b||^2 of unit vectors
    i, j = torch.triu_indices(len(f), len(f), offset=1)
    return float(torch.logsumexp(-t * sq[i, j], 0)) - math.log(len(i))


def projector_of(method: nn.Module) -> nn.Module | None:
    """The method's projector (VICReg calls its ``expander``), None where it has none."""
    for name in ("projector", "expander"):
        module = getattr(method, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def saved_projector(loss: Any, run_dir: Path, encoder: nn.Module) -> nn.Module | None:
    """The projector of a finished run, for ``rankme_projector`` in ``contrast eval``: the
    method ``loss`` (the run's ``cfg.loss``) builds around a copy of ``encoder``, loaded from
    the run's last checkpoint when that checkpoint's encoder is ``encoder`` (its trained
    weights, as the end of training saves both). None, with a line saying why, where the run
    kept no checkpoint (``trainer.checkpoint=false``), it cannot be read or is of another
    state than the encoder's, or the method has no projector."""
    from contrastive_cli.checkpoint import latest_valid_checkpoint, load_checkpoint
    from contrastive_cli.config import build
    from contrastive_cli.errors import CheckpointError
    from contrastive_cli.weights import load_weights

    try:
        path = latest_valid_checkpoint(run_dir / "checkpoints")
        if path is None:
            log.info("no rankme_projector: the run kept no checkpoint (the projector's weights)")
            return None
        state = load_checkpoint(path).get("method")
        own = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
        if not isinstance(state, dict) or not all(
            _same_tensor(state.get(k), v) for k, v in own.items()
        ):
            log.warning(
                f"warning: no rankme_projector: {path} is not the state the encoder was saved in"
            )
            return None
        method = build(loss, encoder=copy.deepcopy(encoder).cpu())
        load_weights(method, state, path)
    except CheckpointError as e:
        log.warning(f"warning: no rankme_projector: {e}")
        return None
    return projector_of(method)


def _same_tensor(a: Any, b: Tensor) -> bool:
    return isinstance(a, Tensor) and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())


@dataclass
class LabelFreeSample:
    """The fixed images the label-free metrics see, and their two augmented views.

    ``images``: uint8 (S, C, H, W); ``views``: two float32 (S, C, H, W) tensors, normalised
    as the training augmentation leaves them (``Augment.__call__``).
    """

    images: Tensor
    views: tuple[Tensor, Tensor]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    indices: Tensor | None = None  # (S,) the images' positions in ``source``
    source: Any = field(default=None, repr=False, compare=False)  # what they were drawn from

    def of_split(self, images: Any) -> bool:
        """Whether the sample was drawn from ``images`` (the same object): then its clean
        features are rows ``indices`` of that split's features, no second pass needed."""
        return self.source is not None and self.source is images and self.indices is not None

    @staticmethod
    def of(images: Any, augment: Any, size: int, seed: int = SAMPLE_SEED) -> LabelFreeSample:
        """``size`` images of ``images`` (all of them when fewer), fixed by ``seed``."""
        g = torch.Generator().manual_seed(derive_seed(seed, "labelfree"))
        idx = torch.randperm(len(images), generator=g)[:size].sort().values
        chosen = images[idx]
        if not isinstance(chosen, Tensor):  # image files, streamed: decoded once, here
            chosen = torch.cat(list(chosen.split(256)))
        g = torch.Generator().manual_seed(derive_seed(seed, "labelfree-views"))
        views = (augment(chosen, g), augment(chosen, g))
        return LabelFreeSample(chosen, views, tuple(augment.mean), tuple(augment.std), idx, images)

    def pixels(self, views: Tensor) -> Tensor:
        """Augmented views as the raw-pixel baseline sees them: pixels in [0, 1], flattened
        (the normalisation undone), as ``pixel_features`` gives for the images."""
        c = views.shape[1]
        mean = torch.tensor(self.mean, device=views.device).expand(c).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=views.device).expand(c).view(1, -1, 1, 1)
        return (views * std + mean).clamp_(0, 1).flatten(1)


@dataclass
class SampleFeatures:
    """One feature map applied to a ``LabelFreeSample``: what the label-free evaluators read."""

    clean: Tensor  # (S, D) features of the images, no augmentation
    views: tuple[Tensor, Tensor]  # (S, D) each: features of the two augmented views
    projected: Tensor | None = None  # (S, P) the method's projector on ``clean``, if any


def sample_features(
    sample: LabelFreeSample,
    features: Callable[[Tensor], Tensor],
    view_features: Callable[[Tensor], Tensor],
    projector: nn.Module | None = None,
    clean: Tensor | None = None,
) -> SampleFeatures:
    """``features`` of the sample's images (uint8 in), ``view_features`` of its views (float,
    already augmented and normalised in), and the projector's output on the clean features.
    ``clean``: those features already computed (rows of the split's features it was drawn
    from), instead of a pass over the images."""
    if clean is None:
        clean = features(sample.images)
    views = (view_features(sample.views[0]), view_features(sample.views[1]))
    projected = None
    if projector is not None:
        was = projector.training
        projector.eval()
        try:
            with torch.no_grad():
                projected = projector(clean).float()
        finally:
            projector.train(was)
    return SampleFeatures(clean, views, projected)


def labelfree_metrics(f: SampleFeatures) -> dict[str, float]:
    """All three metrics (and RankMe of the projector's output) of one feature map."""
    metrics = {"rankme": rankme(f.clean)}
    if f.projected is not None:
        metrics["rankme_projector"] = rankme(f.projected)
    metrics["alignment"] = alignment(*f.views)
    metrics["uniformity"] = uniformity(f.clean)
    return metrics


class LabelFreeMonitor:
    """The label-free metrics during training (``eval.every``): of a fixed sample of the
    train split (of the images trained on, without labels); the test split is left alone."""

    def __init__(
        self,
        images: Any,
        augment: Any,
        size: int,
        device: torch.device,
        batch_size: int = 1024,
        channels_last: bool = False,
        autocast: bool = False,
    ):
        self.sample = LabelFreeSample.of(images, augment, size)
        self.normalize, self.device, self.batch_size = augment.normalize, device, batch_size
        self.channels_last, self.autocast = channels_last, autocast

    def __call__(self, encoder: nn.Module, projector: nn.Module | None = None) -> dict[str, float]:
        from contrastive_cli.evaluate import extract_features

        def features(transform: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
            return lambda x: extract_features(
                encoder,
                x,
                transform,
                self.device,
                self.batch_size,
                self.channels_last,
                self.autocast,
            )

        return labelfree_metrics(
            sample_features(self.sample, features(self.normalize), features(_same), projector)
        )


def _same(x: Tensor) -> Tensor:
    return x
