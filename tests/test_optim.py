"""LARS against a per-element implementation of its update, its exclusions, its trust ratio's
scale invariance, and a state_dict round trip that continues identically."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from contrastive_cli.config import build
from contrastive_cli.optim import LARS


def make_params(seed: int = 0) -> list[nn.Parameter]:
    """A conv weight (4-D), a linear weight (2-D), a bias and a norm scale (1-D), float64."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 2, 2, 2), (4, 5), (4,), (3,)]
    return [nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64)) for s in shapes]


def grads(params: list[nn.Parameter], step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64) * (step + 1) for p in params]


def naive_lars(weights, all_grads, lrs, momentum, wd, eta, clip, eps, exclude):
    """You et al.'s update, element by element in Python floats; returns the final weights."""
    w = [p.detach().flatten().tolist() for p in weights]
    dims = [p.dim() for p in weights]
    buf: list[list[float] | None] = [None] * len(w)
    for lr, step_grads in zip(lrs, all_grads, strict=True):
        for i, g_tensor in enumerate(step_grads):
            g = g_tensor.flatten().tolist()
            if exclude and dims[i] <= 1:
                u = g
            else:
                w_norm = math.sqrt(sum(x * x for x in w[i]))
                g_norm = math.sqrt(sum(x * x for x in g))
                ratio = eta * w_norm / (g_norm + wd * w_norm + eps)
                if clip:
                    ratio = min(ratio / lr, 1.0)
                if w_norm == 0 or g_norm == 0:
                    ratio = 1.0
                u = [ratio * (gk + wd * wk) for gk, wk in zip(g, w[i], strict=True)]
            if buf[i] is None:
                buf[i] = list(u)
            else:
                buf[i] = [momentum * b + uk for b, uk in zip(buf[i], u, strict=True)]
            w[i] = [wk - lr * b for wk, b in zip(w[i], buf[i], strict=True)]
    return w


def run_lars(params, lrs, **kwargs) -> LARS:
    opt = LARS(params, lr=lrs[0], **kwargs)
    for step, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr  # as a scheduler does
        for p, g in zip(params, grads(params, step), strict=True):
            p.grad = g
        opt.step()
    return opt


@pytest.mark.parametrize("clip_lr", [True, False])
@pytest.mark.parametrize("exclude", [True, False])
@pytest.mark.parametrize("momentum,wd,eta", [(0.9, 1e-4, 0.02), (0.0, 0.0, 0.001), (0.5, 0.1, 1.0)])
def test_lars_equals_a_per_element_implementation(clip_lr, exclude, momentum, wd, eta):
    lrs = [0.05, 0.3, 0.2, 0.01]  # warmup-like then decaying, so clipping both binds and not
    params = make_params()
    start = [p.detach().clone() for p in params]
    kwargs = dict(momentum=momentum, weight_decay=wd, trust_coefficient=eta, clip_lr=clip_lr)
    run_lars(params, lrs, **kwargs, exclude_bias_and_norm=exclude)
    all_grads = [grads(params, s) for s in range(len(lrs))]
    expected = naive_lars(start, all_grads, lrs, momentum, wd, eta, clip_lr, 1e-8, exclude)
    for p, e in zip(params, expected, strict=True):
        assert torch.allclose(
            p.detach().flatten(), torch.tensor(e, dtype=torch.float64), rtol=1e-12
        )


def test_excluded_parameters_take_plain_sgd_with_momentum():
    """Biases and norm scales: torch's SGD with momentum and no weight decay, exactly."""
    params = make_params()
    reference = [nn.Parameter(p.detach().clone()) for p in params[2:]]
    sgd = torch.optim.SGD(reference, lr=0.1, momentum=0.9)
    lars = LARS(params, lr=0.1, momentum=0.9, weight_decay=0.5, trust_coefficient=0.001)
    for step in range(4):
        for p, g in zip(params, grads(params, step), strict=True):
            p.grad = g
        for p, g in zip(reference, grads(params, step)[2:], strict=True):
            p.grad = g
        lars.step()
        sgd.step()
    for p, r in zip(params[2:], reference, strict=True):
        assert torch.equal(p, r)


def test_trust_ratio_makes_the_step_independent_of_the_gradients_scale():
    """Without weight decay, eps or clipping, the step of a weight tensor is
    lr * eta * ||w|| * g / ||g||: scaling the gradient by 1000 changes nothing."""
    a, b = make_params(), make_params()
    for params, scale in ((a, 1.0), (b, 1000.0)):
        opt = LARS(params, lr=0.5, weight_decay=0.0, trust_coefficient=0.01, clip_lr=False, eps=0.0)
        for p, g in zip(params, grads(params, 0), strict=True):
            p.grad = g * scale
        opt.step()
    for p, q in zip(a[:2], b[:2], strict=True):
        assert torch.allclose(p, q, rtol=1e-12)
    w, g = make_params()[1], grads(make_params(), 0)[1]
    expected = w - 0.5 * 0.01 * w.norm() * g / g.norm()
    assert torch.allclose(a[1], expected, rtol=1e-12)


def test_clipping_never_steps_further_than_sgd_at_the_same_lr():
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = LARS(params, lr=0.1, momentum=0.0, weight_decay=0.0, trust_coefficient=100.0)
    for p, g in zip(params, grads(params, 0), strict=True):
        p.grad = g
    opt.step()
    for p, b, g in zip(params, before, grads(params, 0), strict=True):
        assert torch.allclose(p, b - 0.1 * g, rtol=1e-12)  # a huge ratio clipped to 1


def test_a_zero_weight_or_gradient_takes_the_unscaled_step():
    w = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
    opt = LARS([w], lr=0.1, momentum=0.0, trust_coefficient=0.001, clip_lr=False)
    w.grad = torch.ones(2, 3, dtype=torch.float64)
    opt.step()
    assert torch.allclose(w, torch.full((2, 3), -0.1, dtype=torch.float64))
    w.grad = torch.zeros(2, 3, dtype=torch.float64)  # only weight decay: wd * w, ratio 1
    opt.step()
    assert torch.allclose(w, torch.full((2, 3), -0.1 + 0.1 * 1e-4 * 0.1, dtype=torch.float64))


def test_parameters_without_gradient_are_left_alone():
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = LARS(params, lr=0.1)
    params[0].grad = grads(params, 0)[0]
    opt.step()
    assert not torch.equal(params[0], before[0])
    assert all(torch.equal(p, b) for p, b in zip(params[1:], before[1:], strict=True))


def test_state_dict_round_trip_continues_identically():
    """Four steps straight, or two, a state_dict saved and loaded (weights_only, as
    checkpoints are) into a new optimizer, then two more: the same weights, bit for bit."""
    lrs = [0.1, 0.3, 0.2, 0.05]
    straight = make_params()
    run_lars(straight, lrs)

    first = make_params()
    opt = run_lars(first, lrs[:2])
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    saved.seek(0)
    resumed = [nn.Parameter(p.detach().clone()) for p in first]
    opt2 = LARS(resumed, lr=1.0)  # hyperparameters come from the state dict
    opt2.load_state_dict(torch.load(saved, weights_only=True))
    assert opt2.param_groups[0]["trust_coefficient"] == 0.02
    for step, lr in enumerate(lrs[2:], start=2):
        opt2.param_groups[0]["lr"] = lr
        for p, g in zip(resumed, grads(resumed, step), strict=True):
            p.grad = g
        opt2.step()
    for a, b in zip(straight, resumed, strict=True):
        assert torch.equal(a, b)


def test_built_from_the_shipped_config_as_a_partial(compose_cfg):
    cfg = compose_cfg("optim=lars", "optim.lr=0.2")
    opt = build(cfg.optim.optimizer)(make_params())
    assert isinstance(opt, LARS)
    group = opt.param_groups[0]
    assert group["lr"] == 0.2 and group["trust_coefficient"] == 0.02 and group["clip_lr"]
    assert group["weight_decay"] == 1e-4 and group["exclude_bias_and_norm"]


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"lr": 0.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"trust_coefficient": 0.0}, "trust_coefficient"),
        ({"eps": -1.0}, "eps"),
    ],
)
def test_lars_rejects_bad_hyperparameters(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LARS(make_params(), **{"lr": 0.1, **kwargs})
