"""DINO: self-distillation with no labels (Caron et al., 2021). A student (encoder + DINO
head) matches the centred, sharpened output of a teacher, its EMA copy, across crops."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from contrastive_cli.distributed import Gather, all_gather
from contrastive_cli.losses.dino import dino_center, dino_loss, teacher_temperature
from contrastive_cli.methods.momentum import cosine_momentum, frozen_copy, update_momentum
from contrastive_cli.schema import Momentum, Positive, Probability


class DINO(nn.Module):
    """Student: every view (2 global crops, then ``data.augment.local_crops`` local ones);
    teacher: the 2 global crops only. The loss pairs each teacher crop with every other
    student crop (``losses.dino``). After each optimizer step: the teacher moves towards the
    student with the cosine momentum schedule (``base_momentum`` -> 1, paper section 3.1 and
    BYOL's schedule) and the centre moves towards the mean of this step's teacher outputs over
    the global batch (``dino_center`` with ``gather``). The teacher temperature warms up
    linearly from ``teacher_temp_start`` to ``teacher_temp_end`` over the first
    ``teacher_temp_warmup`` of training (a fraction: the paper's 30 epochs of 100 is 0.3),
    then stays.

    State (the teacher, the centre, the training progress the temperature depends on) lives
    in submodules and buffers, so checkpoints carry it and a resumed run continues exactly.
    """

    uses_local_crops = True  # read by validate: the other methods refuse local crops

    def __init__(
        self,
        encoder: nn.Module,
        head: Callable[[int], nn.Module],
        base_momentum: Probability = 0.996,
        center_momentum: Momentum = 0.9,
        student_temp: Positive = 0.1,
        teacher_temp_start: Positive = 0.04,
        teacher_temp_end: Positive = 0.07,
        teacher_temp_warmup: Probability = 0.3,
        gather: Gather = all_gather,  # the identity in one process
    ):
        super().__init__()
        if not 0 <= base_momentum <= 1:
            raise ValueError(f"loss.base_momentum must be in [0, 1], got {base_momentum}")
        if not 0 <= center_momentum < 1:
            raise ValueError(f"loss.center_momentum must be in [0, 1), got {center_momentum}")
        for name, value in (
            ("student_temp", student_temp),
            ("teacher_temp_start", teacher_temp_start),
            ("teacher_temp_end", teacher_temp_end),
        ):
            if value <= 0:
                raise ValueError(f"loss.{name} must be > 0, got {value}")
        if not 0 <= teacher_temp_warmup <= 1:
            raise ValueError(
                f"loss.teacher_temp_warmup must be in [0, 1] (a fraction of training), "
                f"got {teacher_temp_warmup}"
            )
        self.encoder = encoder
        self.head = head(encoder.out_dim)
        self.teacher_encoder = frozen_copy(encoder)
        self.teacher_head = frozen_copy(self.head)
        out_dim = self.head.out_dim
        self.register_buffer("center", torch.zeros(1, out_dim))  # (1, K)
        # (optimizer steps taken, total steps): the teacher temperature's clock. Integers in
        # a buffer, so a resumed run picks up exactly where it stopped, on any device.
        self.register_buffer("steps", torch.zeros(2, dtype=torch.long))
        self.base_momentum = base_momentum
        self.center_momentum = center_momentum
        self.student_temp = student_temp
        self.teacher_temp_start = teacher_temp_start
        self.teacher_temp_end = teacher_temp_end
        self.teacher_temp_warmup = teacher_temp_warmup
        self.gather = gather
        self._teacher_logits: list[Tensor] | None = None
        self._progress: float | None = None  # ``steps`` read once, not synced every step
        self.register_load_state_dict_post_hook(_forget_progress)

    def teacher_temp(self) -> float:
        """tau_t for the next step."""
        if self._progress is None:
            step, total = self.steps.tolist()
            self._progress = _progress(step, total)
        return teacher_temperature(
            self._progress, self.teacher_temp_start, self.teacher_temp_end, self.teacher_temp_warmup
        )

    def forward(self, views: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        n = views[0].shape[0]
        globals_ = torch.cat([views[0], views[1]])  # (2N, C, H, W)
        student = list(self.head(self.encoder(globals_)).chunk(2))  # 2 x (N, K)
        if len(views) > 2:  # local crops: smaller, so one more pass through the encoder
            local = torch.cat(list(views[2:]))  # (V_local * N, C, h, w)
            student += list(self.head(self.encoder(local)).split(n))
        with torch.no_grad():
            teacher = list(self.teacher_head(self.teacher_encoder(globals_)).chunk(2))
        self._teacher_logits = teacher
        return dino_loss(student, teacher, self.center, self.student_temp, self.teacher_temp())

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        # As BYOL: the k-th update uses the schedule's value at k - 1 (base at the first).
        m = cosine_momentum(step - 1, total_steps, self.base_momentum)
        update_momentum(self.encoder, self.teacher_encoder, m)
        update_momentum(self.head, self.teacher_head, m)
        if self._teacher_logits is not None:
            self.center.copy_(
                dino_center(self._teacher_logits, self.center, self.center_momentum, self.gather)
            )
            self._teacher_logits = None
        self.steps.copy_(torch.tensor([step, total_steps]))
        self._progress = _progress(step, total_steps)


def _progress(step: int, total_steps: int) -> float:
    """The fraction of training done, in [0, 1]."""
    return min(step / max(total_steps, 1), 1.0)


def _forget_progress(module: nn.Module, incompatible_keys: object) -> None:
    """After a checkpoint is loaded, read the ``steps`` buffer anew."""
    module._progress = None  # type: ignore[assignment]
