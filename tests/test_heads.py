"""Heads: the projector/predictor MLP at every depth, and DINO's head."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrastive_cli.models.heads import DINOHead, Prototypes, mlp_head


def old_mlp_head(in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool) -> nn.Sequential:
    """The two-layer head as it was before heads had a depth, written out."""
    hidden: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=not batch_norm)]
    if batch_norm:
        hidden.append(nn.BatchNorm1d(hidden_dim))
    return nn.Sequential(*hidden, nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


@pytest.mark.parametrize("batch_norm", [True, False])
def test_the_default_head_is_the_old_two_layer_head_bit_for_bit(batch_norm):
    """Existing configs (and their checkpoints) build exactly what they built before."""
    torch.manual_seed(0)
    new = mlp_head(6, 16, 4, batch_norm=batch_norm)
    torch.manual_seed(0)
    old = old_mlp_head(6, 16, 4, batch_norm)
    assert [type(m) for m in new] == [type(m) for m in old]
    assert new.state_dict().keys() == old.state_dict().keys()
    for key, value in old.state_dict().items():
        assert torch.equal(new.state_dict()[key], value), key
    x = torch.randn(8, 6)
    assert torch.equal(new(x), old(x))


@pytest.mark.parametrize("layers", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_norm", [True, False])
def test_a_head_has_its_number_of_linear_layers_and_widths(layers, batch_norm):
    head = mlp_head(6, 16, 4, batch_norm=batch_norm, layers=layers)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert len(linears) == layers
    assert [(m.in_features, m.out_features) for m in linears] == (
        [(6, 16)] + [(16, 16)] * (layers - 2) + [(16, 4)] if layers > 1 else [(6, 4)]
    )
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head) == (layers - 1) * batch_norm
    assert sum(isinstance(m, nn.ReLU) for m in head) == layers - 1
    assert linears[-1].bias is not None  # no BatchNorm after the output: it keeps its bias
    assert all((m.bias is None) == batch_norm for m in linears[:-1])
    assert head(torch.randn(5, 6)).shape == (5, 4)


def test_simsiams_projector_normalises_its_output_without_affine():
    head = mlp_head(6, 16, 4, layers=3, output_batch_norm=True)
    last_linear, last = head[-2], head[-1]
    assert isinstance(last, nn.BatchNorm1d) and not last.affine
    assert isinstance(last_linear, nn.Linear) and last_linear.bias is None
    out = head.train()(torch.randn(32, 6))
    assert torch.allclose(out.mean(0), torch.zeros(4), atol=1e-5)
    assert torch.allclose(out.var(0, unbiased=False), torch.ones(4), atol=1e-3)


def test_gelu_heads():
    head = mlp_head(6, 16, 4, layers=3, activation="gelu")
    assert sum(isinstance(m, nn.GELU) for m in head) == 2 and not any(
        isinstance(m, nn.ReLU) for m in head
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layers": 0}, "layers must be >= 1"),
        ({"hidden_dim": 0}, "hidden_dim must be >= 1"),
        ({"out_dim": 0}, "out_dim must be >= 1"),
        ({"activation": "tanh"}, "activation must be one of"),
    ],
)
def test_bad_head_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mlp_head(**{"in_dim": 6, "hidden_dim": 16, "out_dim": 4, **kwargs})


# --------------------------------------------------------------------------- DINO
def test_dino_head_is_mlp_then_unit_bottleneck_then_cosine_to_unit_prototypes():
    torch.manual_seed(0)
    head = DINOHead(6, hidden_dim=16, bottleneck_dim=5, out_dim=7)
    linears = [m for m in head.mlp if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(6, 16), (16, 16), (16, 5)]
    assert not any(isinstance(m, nn.BatchNorm1d) for m in head.mlp)  # the paper's default
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == 2
    assert head.prototypes.norm is None  # norm_last_layer: prototypes of norm 1, not learnt
    x = torch.randn(4, 6, dtype=torch.float64)
    head = head.double()
    logits = head(x).detach()
    assert logits.shape == (4, 7) and head.out_dim == 7
    # Naive: logit (n, k) is the cosine of the bottleneck b_n and the prototype v_k.
    b = head.mlp(x).detach()
    v = head.prototypes.weight.detach()
    for n in range(4):
        for k in range(7):
            expected = float(b[n] @ v[k]) / (float(b[n].norm()) * float(v[k].norm()))
            assert float(logits[n, k]) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_dino_head_can_learn_the_prototypes_norms():
    torch.manual_seed(0)
    head = DINOHead(6, hidden_dim=16, bottleneck_dim=5, out_dim=7, norm_last_layer=False)
    assert head.prototypes.norm is not None and head.prototypes.norm.requires_grad
    with torch.no_grad():
        head.prototypes.norm.fill_(3.0)
    x = torch.randn(4, 6)
    expected = 3.0 * F.normalize(head.mlp(x), dim=1) @ F.normalize(head.prototypes.weight, dim=1).T
    assert torch.allclose(head(x), expected, atol=1e-6)
    head(x).sum().backward()
    assert head.prototypes.norm.grad is not None


def test_dino_head_batch_norm_option_and_bad_sizes():
    assert any(isinstance(m, nn.BatchNorm1d) for m in DINOHead(6, 16, 5, 7, batch_norm=True).mlp)
    with pytest.raises(ValueError, match="out_dim"):
        Prototypes(5, 0)
    with pytest.raises(ValueError, match="out_dim"):
        DINOHead(6, 16, 5, 0)
