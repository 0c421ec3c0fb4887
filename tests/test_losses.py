"""The training objectives against hand-computed numbers, gradient signs, and KTO's reference point."""

from __future__ import annotations

import math

import pytest
import torch

from prm_ray.core.losses import (
    ce_loss,
    dpo_loss,
    kto_loss,
    kto_reference_point,
    nca_loss,
)
from prm_ray.core.objectives import OBJECTIVES, get_objective

T = torch.tensor


def test_ce_hand_numbers():
    # eq. 5: label 1 -> -log sigmoid(r) = log(1 + e^-r); label 0 -> log(1 + e^r)
    r = T([0.7, 0.7, -2.0], dtype=torch.float64)
    labels = T([1, 0, 0])
    per_row = ce_loss(r, labels, reduction="none")
    expected = T([0.4031860488854579, 1.103186048885458, 0.1269280110429725], dtype=torch.float64)
    torch.testing.assert_close(per_row, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ce_loss(r, labels), expected.mean(), rtol=0, atol=1e-12)
    torch.testing.assert_close(ce_loss(r, labels, reduction="sum"), expected.sum(), rtol=0, atol=1e-12)


def test_ce_is_stable_for_large_rewards():
    loss = ce_loss(T([200.0, -200.0]), T([0, 1]), reduction="none")
    assert torch.isfinite(loss).all()
    torch.testing.assert_close(loss, T([200.0, 200.0]))


def test_dpo_hand_number():
    # -log sigmoid(0.3 - (-0.2)) = log(1 + e^-0.5)
    loss = dpo_loss(T([0.3], dtype=torch.float64), T([-0.2], dtype=torch.float64))
    assert loss.item() == pytest.approx(0.4740769841801067, abs=1e-12)


def test_nca_hand_number():
    # log(1+e^-0.3) + 0.5 log(1+e^0.3) + 0.5 log(1+e^-0.2)
    loss = nca_loss(T([0.3], dtype=torch.float64), T([-0.2], dtype=torch.float64))
    assert loss.item() == pytest.approx(1.2806023013935866, abs=1e-12)


def test_kto_hand_numbers_and_weights():
    r = T([0.5, 0.5, 1.5], dtype=torch.float64)
    labels = T([True, False, True])
    per_row = kto_loss(r, labels, z_ref=0.2, reduction="none")
    # desirable: 1 - sigmoid(0.5 - 0.2); undesirable: 1 - sigmoid(0.2 - 0.5); 1 - sigmoid(1.3)
    expected = T([0.42555748318834097, 0.5744425168116589, 1 - torch.sigmoid(T(1.3, dtype=torch.float64)).item()],
                 dtype=torch.float64)
    torch.testing.assert_close(per_row, expected, rtol=0, atol=1e-12)
    weighted = kto_loss(r, labels, z_ref=0.2, desirable_weight=2.0, undesirable_weight=0.5, reduction="none")
    torch.testing.assert_close(weighted, expected * T([2.0, 0.5, 2.0], dtype=torch.float64), rtol=0, atol=1e-12)
    # mean over all rows (TRL concatenates weighted desirable and undesirable losses)
    assert kto_loss(r, labels, 0.2).item() == pytest.approx(expected.mean().item(), abs=1e-12)


def test_kto_reference_point_clamps_and_detaches():
    neg = T([-1.0, 0.2], requires_grad=True)
    z = kto_reference_point(neg)
    assert z.item() == 0.0 and not z.requires_grad
    pos = T([0.3, 0.5], requires_grad=True)
    z = kto_reference_point(pos)
    assert z.item() == pytest.approx(0.4) and not z.requires_grad

    # no gradient reaches z_ref through the loss either
    z_live = T(0.1, requires_grad=True)
    r = T([0.5, -0.5], requires_grad=True)
    kto_loss(r, T([1, 0]), z_live).backward()
    assert z_live.grad is None
    assert r.grad is not None


def _grad(fn, *xs):
    ts = [T([x], dtype=torch.float64, requires_grad=True) for x in xs]
    fn(*ts).backward()
    return [t.grad.item() for t in ts]


def test_gradient_signs():
    # Minimising pushes correct responses' rewards up and incorrect ones down.
    assert _grad(lambda r: ce_loss(r, T([1])), 0.3)[0] < 0
    assert _grad(lambda r: ce_loss(r, T([0])), 0.3)[0] > 0
    g_c, g_r = _grad(dpo_loss, 0.3, -0.2)
    assert g_c < 0 < g_r and g_c == pytest.approx(-g_r)
    g_c, g_r = _grad(nca_loss, 0.3, -0.2)  # d/dr_c = 1.5 sigmoid(r_c) - 1 < 0 for r_c < log 2
    assert g_c < 0 < g_r
    assert _grad(lambda r: kto_loss(r, T([1]), 0.1), 0.3)[0] < 0
    assert _grad(lambda r: kto_loss(r, T([0]), 0.1), 0.3)[0] > 0


def test_registry_and_errors():
    assert set(OBJECTIVES) == {"ce", "dpo", "kto", "nca", "math-shepherd-hard", "math-shepherd-soft"}
    assert {n for n, o in OBJECTIVES.items() if o.paired} == {"dpo", "nca"}
    assert {n for n, o in OBJECTIVES.items() if o.needs_reference_point} == {"kto"}
    assert get_objective("dpo").loss is dpo_loss
    with pytest.raises(ValueError, match="ce, dpo, kto, math-shepherd-hard, math-shepherd-soft, nca"):
        get_objective("ipo")
    with pytest.raises(ValueError, match="reduction"):
        dpo_loss(T([0.0]), T([0.0]), reduction="max")


def test_step_label_loss_hand_numbers_and_masking():
    from prm_ray.core.losses import step_label_loss

    z = torch.tensor([[0.0, 2.0, 5.0], [-1.0, 9.0, 9.0]])
    labels = torch.tensor([[1.0, 0.0, 0.25], [0.0, 1.0, 1.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    per = [math.log(2), math.log1p(math.exp(2.0)), 0.25 * math.log1p(math.exp(-5.0)) + 0.75 * math.log1p(math.exp(5.0)),
           math.log1p(math.exp(-1.0))]
    assert float(step_label_loss(z, labels, mask)) == pytest.approx(sum(per) / 4, rel=1e-6)
    assert step_label_loss(z, labels, mask, reduction="none")[1, 1:].tolist() == [0.0, 0.0]
    z.requires_grad_(True)
    step_label_loss(z, labels, mask).backward()
    assert z.grad[1, 1:].abs().sum() == 0 and z.grad[0, 0] < 0 and z.grad[0, 1] > 0
    assert get_objective("math-shepherd-soft").explicit and not get_objective("ce").explicit
