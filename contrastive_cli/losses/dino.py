"""DINO's self-distillation loss, its centre and teacher-temperature schedule (Caron et al., 2021)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive_cli.distributed import Gather, local_only
from contrastive_cli.losses.precision import full_precision, upcast


def dino_loss(
    student_logits: Sequence[Tensor],
    teacher_logits: Sequence[Tensor],
    center: Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> Tensor:
    """Cross-entropy of the centred, sharpened teacher against the student, over crop pairs:

        P_t = softmax((g_t - center) / tau_t)       (constant: stop-gradient)
        P_s = softmax(g_s / tau_s)
        loss = mean over pairs (t, s), s != t, of mean_n sum_k -P_t[n, k] log P_s[n, k]

    t runs over the teacher's crops (the global ones), s over the student's; student crop i
    and teacher crop i are the same crop for i < len(teacher_logits) (the paper's Algorithm
    1 and the authors' loss; 2 teacher and V student crops give 2V - 2 pairs).

    Args:
        student_logits: V tensors (N, K), one per crop: the globals first, then the locals.
        teacher_logits: G <= V tensors (N, K): the teacher's outputs on the global crops.
        center: (K,) or (1, K), the running mean of the teacher's outputs (``dino_center``);
            treated as a constant.
        student_temp: tau_s > 0, the paper's 0.1.
        teacher_temp: tau_t > 0, 0.04 to 0.07 (``teacher_temperature``).
    Per-sample, so equal-sized processes' mean equals the whole batch's: no gather needed.
    """
    if student_temp <= 0:
        raise ValueError(f"student_temp must be > 0, got {student_temp}")
    if teacher_temp <= 0:
        raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
    if not teacher_logits or len(student_logits) < max(2, len(teacher_logits)):
        raise ValueError(
            f"need >= 1 teacher crop and >= 2 student crops, at least as many as the teacher's; "
            f"got {len(teacher_logits)} teacher and {len(student_logits)} student crops"
        )
    shape = student_logits[0].shape
    if any(x.shape != shape or x.dim() != 2 for x in (*student_logits, *teacher_logits)):
        raise ValueError(
            "every crop's logits must be (N, K) of one shape, got "
            f"{[tuple(x.shape) for x in (*student_logits, *teacher_logits)]}"
        )
    with full_precision(student_logits[0]):
        center = upcast(center.detach()).reshape(1, -1)
        teacher = [
            F.softmax((upcast(t.detach()) - center) / teacher_temp, dim=1) for t in teacher_logits
        ]
        student = [F.log_softmax(upcast(s) / student_temp, dim=1) for s in student_logits]
        terms = [
            (-q * log_p).sum(dim=1).mean()
            for iq, q in enumerate(teacher)
            for v, log_p in enumerate(student)
            if v != iq
        ]
        return torch.stack(terms).mean()


@torch.no_grad()
def dino_center(
    teacher_logits: Sequence[Tensor],
    center: Tensor,
    momentum: float = 0.9,
    gather: Gather = local_only,
) -> Tensor:
    """The new centre m * center + (1 - m) * mean of the teacher's outputs (paper eq. 4).

    The mean is over every row of every teacher crop of the global batch (all processes'
    rows, as the authors' all_reduce), so every process holds the same centre. No gradient.

    Args:
        teacher_logits: G tensors (N, K), the teacher's outputs on the global crops.
        center: (1, K) current centre (a buffer of the method); returned anew, not modified.
        momentum: m in [0, 1), the paper's 0.9.
        gather: every process's rows.
    """
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    rows, _ = gather(torch.cat([upcast(t.detach()) for t in teacher_logits]))  # (G*M, K)
    batch_center = rows.mean(dim=0, keepdim=True)
    return center * momentum + batch_center.to(center.dtype) * (1 - momentum)


def teacher_temperature(
    epoch: float, start: float = 0.04, end: float = 0.07, warmup_epochs: float = 30
) -> float:
    """tau_t: linear from ``start`` at epoch 0 to ``end`` at ``warmup_epochs``, then ``end``.

    The paper's warm-up (0.04 to 0.07 over the first 30 epochs). ``epoch`` may be
    fractional (step / steps_per_epoch) for a per-step schedule. The authors' code takes
    np.linspace(start, end, warmup_epochs)[epoch], which reaches ``end`` one epoch earlier
    (at warmup_epochs - 1); at integer epochs the two differ by at most
    (end - start) / (warmup_epochs - 1).
    """
    if start <= 0 or end <= 0:
        raise ValueError(f"teacher temperatures must be > 0, got start={start}, end={end}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if epoch >= warmup_epochs:
        return end
    return start + (end - start) * epoch / warmup_epochs
