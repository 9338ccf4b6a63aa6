"""Every loss equals its formula computed by hand on fixed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from dpokit.errors import DpokitError
from dpokit.losses import (
    ChosenRejectedOutputs,
    DPOLoss,
    IPOLoss,
    RSOLoss,
    SimPOLoss,
    build_loss,
)

POLICY = ChosenRejectedOutputs(
    chosen_logps=torch.tensor([-10.0, -20.0]),
    rejected_logps=torch.tensor([-12.0, -18.0]),
    chosen_tokens=torch.tensor([5, 10]),
    rejected_tokens=torch.tensor([4, 6]),
)
REFERENCE = ChosenRejectedOutputs(
    chosen_logps=torch.tensor([-11.0, -19.0]),
    rejected_logps=torch.tensor([-11.5, -19.0]),
    chosen_tokens=torch.tensor([5, 10]),
    rejected_tokens=torch.tensor([4, 6]),
)
# logits = (pi_c - pi_r) - (ref_c - ref_r): pair 0: 2 - 0.5 = 1.5; pair 1: -2 - 0 = -2
LOGITS = [1.5, -2.0]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_matches_formula():
    losses, chosen, rejected = DPOLoss(beta=0.1)(POLICY, REFERENCE)
    expected = [-math.log(sigmoid(0.1 * z)) for z in LOGITS]
    torch.testing.assert_close(losses, torch.tensor(expected))
    torch.testing.assert_close(chosen, torch.tensor([0.1 * 1.0, 0.1 * -1.0]))
    torch.testing.assert_close(rejected, torch.tensor([0.1 * -0.5, 0.1 * 1.0]))


def test_conservative_dpo_matches_formula():
    losses, _, _ = DPOLoss(beta=0.5, label_smoothing=0.2)(POLICY, REFERENCE)
    expected = [-0.8 * math.log(sigmoid(0.5 * z)) - 0.2 * math.log(sigmoid(-0.5 * z)) for z in LOGITS]
    torch.testing.assert_close(losses, torch.tensor(expected))


def test_rso_with_gamma_half_matches_hinge_formula():
    losses, chosen, rejected = RSOLoss(gamma=0.5)(POLICY, REFERENCE)
    torch.testing.assert_close(losses, torch.tensor([max(0.0, 1 - 0.5 * z) for z in LOGITS]))
    torch.testing.assert_close(chosen, torch.tensor([0.5, -0.5]))
    torch.testing.assert_close(rejected, torch.tensor([-0.25, 0.5]))


def test_ipo_uses_length_averaged_logps():
    tau = 0.25
    losses, chosen, _ = IPOLoss(tau=tau)(POLICY, REFERENCE)
    pi = [(-10 / 5) - (-12 / 4), (-20 / 10) - (-18 / 6)]
    ref = [(-11 / 5) - (-11.5 / 4), (-19 / 10) - (-19 / 6)]
    expected = [((p - r) - 1 / (2 * tau)) ** 2 for p, r in zip(pi, ref)]
    torch.testing.assert_close(losses, torch.tensor(expected))
    torch.testing.assert_close(chosen, torch.tensor([tau * (-10 / 5 + 11 / 5), tau * (-20 / 10 + 19 / 10)]))


def test_simpo_is_reference_free_and_matches_formula():
    loss = SimPOLoss(beta=2.0, gamma=0.5)
    assert loss.is_reference_free
    losses, chosen, rejected = loss(POLICY, None)
    expected = [-math.log(sigmoid(2.0 * (-10 / 5 - -12 / 4) - 0.5)), -math.log(sigmoid(2.0 * (-20 / 10 - -18 / 6) - 0.5))]
    torch.testing.assert_close(losses, torch.tensor(expected))
    torch.testing.assert_close(chosen, torch.tensor([2.0 * -2.0, 2.0 * -2.0]))
    torch.testing.assert_close(rejected, torch.tensor([2.0 * -3.0, 2.0 * -3.0]))


def test_sft_term_adds_weighted_chosen_nll_per_token():
    plain, _, _ = DPOLoss(beta=0.1)(POLICY, REFERENCE)
    with_sft, _, _ = DPOLoss(beta=0.1, sft_weight=0.5)(POLICY, REFERENCE)
    torch.testing.assert_close(with_sft - plain, torch.tensor([0.5 * 10 / 5, 0.5 * 20 / 10]))


def test_dpo_loss_is_ln2_when_policy_equals_reference():
    losses, chosen, rejected = DPOLoss(beta=0.1)(REFERENCE, REFERENCE)
    torch.testing.assert_close(losses, torch.full((2,), math.log(2)))
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0


def test_build_loss_sets_parameters_from_config():
    loss = build_loss({"name": "rso", "gamma": 0.5})
    assert isinstance(loss, RSOLoss) and loss.gamma == 0.5


def test_build_loss_rejects_a_parameter_the_loss_lacks():
    with pytest.raises(DpokitError, match=r"loss 'dpo' has no parameter gamma; its parameters: loss.beta, loss.label_smoothing, loss.sft_weight"):
        build_loss({"name": "dpo", "gamma": 0.5})


def test_build_loss_rejects_an_unknown_name():
    with pytest.raises(DpokitError, match="unknown loss 'dpx'; choose one of dpo, hinge, ipo, rso, simpo"):
        build_loss({"name": "dpx"})


def test_build_loss_loads_a_class_by_import_path():
    loss = build_loss({"name": "dpokit.losses:DPOLoss", "beta": 0.3})
    assert isinstance(loss, DPOLoss) and loss.beta == 0.3


def test_build_loss_reports_a_missing_module():
    with pytest.raises(DpokitError, match="cannot import module 'no_such_pkg.losses'"):
        build_loss({"name": "no_such_pkg.losses:MyLoss"})
