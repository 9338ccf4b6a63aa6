"""Unpaired objectives (KTO, APO-zero, BCO) against hand computations, their checks and their metrics."""

from __future__ import annotations

import math

import pytest
import torch

from dpokit.errors import DpokitError
from dpokit.losses import UNPAIRED_LOSSES, build_loss, check_unpaired_loss_outputs, is_unpaired
from dpokit.metrics import UnpairedMetrics
from dpokit.types import RankedOutputs, unpaired_outputs

DESIRABLE = [True, False, True, True, False]


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def groups(own, kl, desirable=DESIRABLE, requires_grad=False) -> RankedOutputs:
    """Unpaired examples as the recipe hands them to a loss: groups of [completion, KL completion], scores
    [label, nan]."""
    logps = torch.tensor([v for pair in zip(own, kl) for v in pair], dtype=torch.float32, requires_grad=requires_grad)
    scores = torch.tensor([v for d in desirable for v in (float(d), float("nan"))])
    return RankedOutputs(
        logps=logps,
        group_sizes=(2,) * len(own),
        scores=scores,
        host_scores=scores,
        tokens=torch.tensor([3, 4] * len(own)),
        mean_logits=torch.zeros(2 * len(own)),
    )


POLICY = [-10.0, -12.5, -8.0, -20.0, -15.0]
POLICY_KL = [-30.0, -25.0, -28.0, -40.0, -33.0]
REFERENCE = [-11.0, -12.0, -9.5, -19.0, -16.0]
REFERENCE_KL = [-31.0, -26.5, -27.0, -41.0, -34.0]


def test_kto_at_step_1_is_half_each_weight_and_its_kl_is_0():
    loss = build_loss({"name": "kto", "beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.5}, "unpaired")
    out = groups(POLICY, POLICY_KL)
    losses, rewards = loss(out, out)
    expected = [0.5 if d else 0.75 for d in DESIRABLE]
    assert losses.tolist() == pytest.approx(expected, abs=1e-7)
    assert rewards.tolist() == [0.0] * 5 and float(loss.kl) == 0.0
    assert loss.term_values["kl"].tolist() == [0.0] * 5


def test_kto_matches_the_hand_computation_with_its_kl_term_and_weights():
    beta, wd, wu = 0.2, 1.0, 1.3
    loss = build_loss({"name": "kto", "beta": beta, "desirable_weight": wd, "undesirable_weight": wu}, "unpaired")
    losses, rewards = loss(groups(POLICY, POLICY_KL), groups(REFERENCE, REFERENCE_KL))
    kl = max(0.0, sum(p - r for p, r in zip(POLICY_KL, REFERENCE_KL)) / 5)  # (1 + 1.5 - 1 + 1 + 1) / 5 = 0.7
    assert kl == pytest.approx(0.7) and float(loss.kl) == pytest.approx(kl)
    expected, expected_rewards = [], []
    for p, r, d in zip(POLICY, REFERENCE, DESIRABLE):
        ratio = p - r
        expected.append(wd * (1 - sigmoid(beta * (ratio - kl))) if d else wu * (1 - sigmoid(beta * (kl - ratio))))
        expected_rewards.append(beta * ratio)
    assert losses.tolist() == pytest.approx(expected, abs=1e-6)
    assert rewards.tolist() == pytest.approx(expected_rewards, abs=1e-6)


def test_kto_clamps_a_negative_kl_estimate_to_0_and_passes_no_gradient_through_it():
    policy = groups(POLICY, [v - 5 for v in REFERENCE_KL], requires_grad=True)  # mean r_KL = -5
    loss = build_loss({"name": "kto", "beta": 0.5}, "unpaired")
    losses, _ = loss(policy, groups(REFERENCE, REFERENCE_KL))
    assert float(loss.kl) == 0.0
    losses.sum().backward()
    grad = policy.logps.grad
    assert grad[1::2].abs().max() == 0  # the KL completions: z is detached
    for g, p, r, d in zip(grad[0::2].tolist(), POLICY, REFERENCE, DESIRABLE):  # d/dr (1 - sigma(+-beta r))
        s = sigmoid(0.5 * (p - r) if d else -0.5 * (p - r))
        assert g == pytest.approx(-0.5 * s * (1 - s) * (1 if d else -1), abs=1e-6)


def test_apo_zero_unpaired_and_bco_unpaired_match_their_formulas():
    beta = 0.3
    policy, reference = groups(POLICY, POLICY_KL), groups(REFERENCE, REFERENCE_KL)
    apo = build_loss({"name": "apo_zero_unpaired", "beta": beta}, "unpaired")
    losses, _ = apo(policy, reference)
    expected = [
        1 - sigmoid(beta * (p - r)) if d else sigmoid(beta * (p - r)) for p, r, d in zip(POLICY, REFERENCE, DESIRABLE)
    ]
    assert losses.tolist() == pytest.approx(expected, abs=1e-6) and apo.kl is None and apo.term_values == {}

    bco = build_loss({"name": "bco_unpaired", "beta": beta}, "unpaired")
    seen = []
    for shift in (0.0, 2.0):  # two training calls: delta is the running mean of every reward so far
        shifted = groups([p + shift for p in POLICY], POLICY_KL)
        losses, rewards = bco(shifted, reference)
        seen += [beta * (p + shift - r) for p, r in zip(POLICY, REFERENCE)]
        delta = sum(seen) / len(seen)
        expected = [
            -math.log(sigmoid(beta * (p + shift - r) - delta))
            if d
            else -math.log(sigmoid(-(beta * (p + shift - r) - delta)))
            for p, r, d in zip(POLICY, REFERENCE, DESIRABLE)
        ]
        assert losses.tolist() == pytest.approx(expected, abs=1e-5)
    assert float(bco.reward_count) == 10
    bco.eval()  # evaluation reads the running mean (with its batch) and leaves it as it was
    bco(policy, reference)
    assert float(bco.reward_count) == 10


def test_bco_unpaired_at_step_1_is_ln2():
    out = groups(POLICY, POLICY_KL)
    losses, _ = build_loss({"name": "bco_unpaired"}, "unpaired")(out, out)
    assert losses.tolist() == pytest.approx([math.log(2)] * 5, abs=1e-6)


@pytest.mark.parametrize(
    ("spec", "shape", "message"),
    [
        ({"name": "kto"}, "pairs", r"loss 'kto' is for unpaired data .*; this data is pairs: choose a pairwise loss"),
        ({"name": "kto"}, "ranked", r"this data is ranked: choose a pairwise or listwise loss such as dpo"),
        ({"name": "dpo"}, "unpaired", r"loss 'dpo' needs pairs; this data is unpaired .*kto, apo_zero_unpaired"),
        ({"name": "plackett_luce"}, "unpaired", r"loss 'plackett_luce' needs ranked groups; this data is unpaired"),
        ({"name": ["kto", "sft"]}, None, r"kto is for unpaired data .* does not combine in a weighted list"),
        ({"name": "kto", "pairs": "all"}, "unpaired", r"loss.pairs applies to pairwise losses on ranked data"),
        ({"name": "kto", "desirable_weight": -1}, "unpaired", r"loss.desirable_weight=-1 is out of range"),
        ({"name": "kto", "label_smoothing": 0.1}, "unpaired", r"loss 'kto' has no parameter label_smoothing"),
    ],
)
def test_build_loss_refuses_what_does_not_fit_unpaired_data(spec, shape, message):
    with pytest.raises(DpokitError, match=message):
        build_loss(spec, shape)


def test_the_registry_lists_the_unpaired_losses_and_a_config_check_accepts_them():
    assert UNPAIRED_LOSSES == ("kto", "apo_zero_unpaired", "bco_unpaired")
    assert all(is_unpaired(build_loss({"name": name}, None)) for name in UNPAIRED_LOSSES)


def test_unpaired_outputs_split_the_groups_and_refuse_other_sizes():
    out = unpaired_outputs(groups(POLICY, POLICY_KL))
    assert out.logps.tolist() == POLICY and out.kl_logps.tolist() == POLICY_KL
    assert out.desirable.tolist() == DESIRABLE and out.tokens.tolist() == [3] * 5 and out.kl_tokens.tolist() == [4] * 5
    three = RankedOutputs(logps=torch.zeros(3), group_sizes=(3,), scores=torch.zeros(3))
    with pytest.raises(DpokitError, match=r"groups of two completions .* got group sizes \[3\]"):
        unpaired_outputs(three)


def test_check_unpaired_loss_outputs_names_the_shapes_it_wants():
    loss = build_loss({"name": "kto"}, "unpaired")
    with pytest.raises(DpokitError, match=r"returned shapes \(\), \(5,\) on unpaired data; it must return"):
        check_unpaired_loss_outputs(loss, (torch.zeros(()), torch.zeros(5)), 5)
    with pytest.raises(DpokitError, match="returned 3 values on unpaired data"):
        check_unpaired_loss_outputs(loss, (torch.zeros(5),) * 3, 5)


def test_unpaired_metrics_by_label():
    policy = groups(POLICY, POLICY_KL)
    rewards = torch.tensor([0.5, 0.2, -0.1, 0.3, -0.4])  # right: yes, no, no, yes, yes
    losses = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    metrics = UnpairedMetrics()
    metrics.add(losses, rewards, policy, 50, {"kl": torch.full((5,), 0.7)})
    means = metrics.means()
    assert means["loss"] == pytest.approx(0.3) and means["rewards/accuracies"] == pytest.approx(0.6)
    assert means["rewards/desirable"] == pytest.approx((0.5 - 0.1 + 0.3) / 3)
    assert means["rewards/undesirable"] == pytest.approx((0.2 - 0.4) / 2)
    assert means["rewards/margins"] == pytest.approx((0.5 - 0.1 + 0.3) / 3 + 0.1)
    assert means["logps/desirable"] == pytest.approx((-10 - 8 - 20) / 3)
    assert means["kl"] == pytest.approx(0.7) and means["fraction_desirable"] == pytest.approx(0.6)
    assert metrics.num_pairs == 5 and metrics.num_tokens == 50
    without = UnpairedMetrics()
    without.add(losses, rewards, policy, 50, {})
    assert "kl" not in without.means()
