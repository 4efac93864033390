"""SwAV's swapped prediction and its Sinkhorn-Knopp codes (Caron et al., 2020, "Unsupervised
Learning of Visual Features by Contrasting Cluster Assignments")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive_cli.losses.precision import full_precision, upcast


@torch.no_grad()
def sinkhorn(scores: Tensor, epsilon: float = 0.05, iterations: int = 3) -> Tensor:
    """Codes Q for B samples over K prototypes: the equipartitioned soft assignment
    (paper eq. 3 and Algorithm 1, three Sinkhorn-Knopp iterations):

        Q = exp(scores / eps)^T / sum(...)              (K, B)
        repeat: rows   Q_k. <- Q_k. / sum_b Q_kb / K     every prototype holds 1/K
                columns Q_.b <- Q_.b / sum_k Q_kb / B    every sample holds 1/B
        return (B * Q)^T                                  (B, K), rows summing to 1

    Always computed in float32 (float64 stays float64), autocast off: exp(1 / 0.05) = 5e8
    overflows float16 and bf16 keeps 3 significant digits, the NaNs of mixed-precision SwAV
    elsewhere. The scores' maximum is subtracted first (the result is the same: Q is
    normalised by its sum), so unnormalised scores cannot overflow float32 either.

    The authors' distributed version all-reduces every sum over the processes; here
    ``scores`` is the whole global batch (the caller gathers it, plus the queue's rows),
    which gives the same codes on every process (see ``methods.swav``).

    Args:
        scores: (B, K) samples' similarities to the prototypes; treated as constants.
        epsilon: eps > 0, the entropy weight (paper 0.05).
        iterations: >= 1 (paper 3).
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    with full_precision(scores):
        s = upcast(scores.detach())
        s = s.float() if s.dtype not in (torch.float32, torch.float64) else s
        tiny = torch.finfo(s.dtype).tiny  # a prototype nobody is near: 0 / tiny, not 0 / 0
        b, k = s.shape
        q = torch.exp((s - s.max()) / epsilon).T  # (K, B)
        q = q / q.sum()
        for _ in range(iterations):
            q = q / q.sum(dim=1, keepdim=True).clamp_min(tiny) / k
            q = q / q.sum(dim=0, keepdim=True).clamp_min(tiny) / b
        return (q * b).T  # (B, K)


def swav_loss(
    scores: Sequence[Tensor], codes: Sequence[Tensor], temperature: float = 0.1
) -> Tensor:
    """The swapped prediction problem over multi-crop (paper eq. 1 and the authors' loop):

        P_v = softmax(scores_v / T)
        loss = mean over code crops i of  mean over crops v != i of
               mean_n sum_k -Q_i[n, k] log P_v[n, k]

    Args:
        scores: V tensors (N, K): every crop's scores against the unit prototypes (the 2
            global crops first, then the local ones); the gradient flows through these.
        codes: G <= V tensors (N, K): Sinkhorn codes of the first G crops (the 2 global
            ones); constants.
        temperature: T > 0 (paper 0.1).
    Per-sample, so equal-sized processes' mean equals the whole batch's: no gather needed.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not codes or len(scores) < max(2, len(codes)):
        raise ValueError(
            f"need >= 1 code crop and >= 2 crops, at least as many as the codes; got "
            f"{len(codes)} codes and {len(scores)} crops"
        )
    with full_precision(scores[0]):
        log_p = [F.log_softmax(upcast(s) / temperature, dim=1) for s in scores]
        terms = [
            torch.stack(
                [
                    (-upcast(q.detach()) * lp).sum(dim=1).mean()
                    for v, lp in enumerate(log_p)
                    if v != i
                ]
            ).mean()
            for i, q in enumerate(codes)
        ]
        return torch.stack(terms).mean()
