"""Every loss equals its formula computed by hand on fixed numbers."""

from __future__ import annotations

import math
from typing import Any, Optional

import pytest
import torch

from dpokit.errors import DpokitError
from dpokit.losses import (
    LOSSES,
    ChosenRejectedOutputs,
    DPOLoss,
    IPOLoss,
    RSOLoss,
    SimPOLoss,
    build_loss,
    loss_parameter_types,
    loss_parameters,
)
from dpokit.losses.base import BETA_WHY

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
    expected = [
        -math.log(sigmoid(2.0 * (-10 / 5 - -12 / 4) - 0.5)),
        -math.log(sigmoid(2.0 * (-20 / 10 - -18 / 6) - 0.5)),
    ]
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
    with pytest.raises(
        DpokitError,
        match=r"loss 'dpo' has no parameter gamma; its parameters: loss.label_smoothing, "
        r"loss.divergence, loss.alpha, loss.beta, loss.sft_weight, loss.wpo",
    ):
        build_loss({"name": "dpo", "gamma": 0.5})


def test_every_loss_with_a_beta_refuses_a_bad_one_with_the_same_line():
    for name, cls in LOSSES.items():
        if "beta" in loss_parameters(cls):
            why = "the weight of the odds-ratio term" if name == "orpo" else BETA_WHY  # ORPO's beta weighs a term
            with pytest.raises(DpokitError) as error:
                build_loss({"name": name, "beta": 0})
            assert str(error.value) == f"loss.beta=0 is out of range; it must be > 0 ({why})", name


def test_loss_parameter_types_include_what_the_bases_declare():
    assert loss_parameter_types(LOSSES["dpop"]) == {"lam": float, "beta": float, "sft_weight": float, "wpo": bool}
    assert loss_parameter_types(LOSSES["ipo"]) == {"tau": float, "sft_weight": float, "wpo": bool}
    assert loss_parameter_types(LOSSES["sft"]) == {"normalize": str}  # sft is the SFT term: no sft_weight, no wpo
    assert SimPOLoss().beta == 2.0 and LOSSES["wpo"]().wpo and not DPOLoss().wpo  # a subclass's own defaults
    for name, cls in LOSSES.items():
        assert set(loss_parameter_types(cls).values()) <= {float, bool, str}, name


def test_loss_parameter_types_of_a_users_subclass_follow_its_kwargs_to_the_base():
    class MarginDPO(DPOLoss):
        def __init__(self, margin: Optional[float] = None, note="", **kwargs):
            super().__init__(**kwargs)
            self.margin, self.note = margin, note

    types = loss_parameter_types(MarginDPO)
    assert list(types) == ["margin", "note", "label_smoothing", "divergence", "alpha", "beta", "sft_weight", "wpo"]
    assert (types["margin"], types["note"], types["beta"]) == (Optional[float], Any, float)


def test_build_loss_rejects_an_unknown_name():
    with pytest.raises(
        DpokitError,
        match="unknown loss 'dpx'; choose one of aot, aot_pair, apo_down, apo_zero, apo_zero_unpaired, bco, ",
    ):
        build_loss({"name": "dpx"})


def test_build_loss_loads_a_class_by_import_path():
    loss = build_loss({"name": "dpokit.losses:DPOLoss", "beta": 0.3})
    assert isinstance(loss, DPOLoss) and loss.beta == 0.3


def test_build_loss_reports_a_missing_module():
    with pytest.raises(DpokitError, match="cannot import module 'no_such_pkg.losses'"):
        build_loss({"name": "no_such_pkg.losses:MyLoss"})


# ----------------------------------------------------------------------------------------------
# every objective, per pair, against its paper's formula written out in plain Python

RW = [-10.0 - -11.0, -20.0 - -19.0]  # r_w = log pi(y_w) - log ref(y_w): pair 0: 1.0, pair 1: -1.0
RL = [-12.0 - -11.5, -18.0 - -19.0]  # r_l: -0.5, 1.0
AVG_PI_W, AVG_PI_L = [-10 / 5, -20 / 10], [-12 / 4, -18 / 6]
AVG_REF_W, AVG_REF_L = [-11 / 5, -19 / 10], [-11.5 / 4, -19 / 6]


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def per_pair(fn):
    return torch.tensor([fn(i) for i in range(2)])


HAND = {
    "robust": (
        dict(beta=0.5, label_smoothing=0.2),
        lambda i: ((0.8 * -logsig(0.5 * LOGITS[i]) + 0.2 * logsig(-0.5 * LOGITS[i])) / 0.6),
    ),
    "dpo_norm": (
        dict(beta=0.5),
        lambda i: -logsig(0.5 * ((AVG_PI_W[i] - AVG_REF_W[i]) - (AVG_PI_L[i] - AVG_REF_L[i]))),
    ),
    "dpop": (dict(beta=0.5, lam=2.0), lambda i: -logsig(0.5 * (LOGITS[i] - 2.0 * max(0.0, -RW[i])))),
    "exo": (
        dict(beta=0.5, label_smoothing=0.01),
        lambda i: (
            sigmoid(0.5 * LOGITS[i]) * (logsig(0.5 * LOGITS[i]) - math.log(0.99))
            + sigmoid(-0.5 * LOGITS[i]) * (logsig(-0.5 * LOGITS[i]) - math.log(0.01))
        ),
    ),
    "nca": (dict(beta=0.5), lambda i: -logsig(0.5 * RW[i]) - 0.5 * logsig(-0.5 * RW[i]) - 0.5 * logsig(-0.5 * RL[i])),
    # delta: the mean of the batch's four rewards (the first batch a fresh loss sees)
    "bco": (
        dict(beta=0.5),
        lambda i: (lambda d: -logsig(0.5 * RW[i] - d) - logsig(-(0.5 * RL[i] - d)))(0.5 * sum(RW + RL) / 4),
    ),
    "sppo_hard": (dict(beta=0.5), lambda i: (RW[i] - 1.0) ** 2 + (RL[i] + 1.0) ** 2),
    "aot_pair": (dict(beta=0.5), lambda i: -logsig(0.5 * (sorted(RW)[i] - sorted(RL)[i]))),
    "aot": (
        dict(beta=0.5),
        lambda i: -logsig(0.5 * (sorted([-10.0 - -12.0, -20.0 - -18.0])[i] - sorted([-11.0 - -11.5, 0.0])[i])),
    ),
    "apo_zero": (dict(beta=0.5), lambda i: 1 - sigmoid(0.5 * RW[i]) + sigmoid(0.5 * RL[i])),
    "apo_down": (dict(beta=0.5), lambda i: sigmoid(0.5 * RW[i]) + 1 - sigmoid(0.5 * LOGITS[i])),
    "discopop": (
        dict(beta=0.5, tau=0.1),
        lambda i: (lambda z: (1 - sigmoid(z / 0.1)) * -logsig(z) + sigmoid(z / 0.1) * math.exp(-z))(0.5 * LOGITS[i]),
    ),
    "simpo": (
        dict(beta=2.0, gamma=0.5, label_smoothing=0.1),
        lambda i: (lambda z: -0.9 * logsig(z) - 0.1 * logsig(-z))(2.0 * (AVG_PI_W[i] - AVG_PI_L[i]) - 0.5),
    ),
    "orpo": (
        dict(beta=0.2),
        lambda i: -AVG_PI_W[i]
        - 0.2
        * logsig(
            (AVG_PI_W[i] - math.log(1 - math.exp(AVG_PI_W[i]))) - (AVG_PI_L[i] - math.log(1 - math.exp(AVG_PI_L[i])))
        ),
    ),
    "sft": (dict(normalize="token"), lambda i: -[-10.0, -20.0][i] * 2 / 15),  # mean = (10 + 20) / (5 + 10) tokens
}
HAND["sft_pair"] = (dict(normalize="pair"), lambda i: -AVG_PI_W[i])


def divergence_margin(kind: str, alpha: float, i: int) -> float:
    """f'(u_w) - f'(u_l) of f-DPO, from the log-ratios, written out per divergence."""
    if kind == "forward_kl":
        return -math.exp(-RW[i]) + math.exp(-RL[i])
    if kind == "js_divergence":
        f = lambda r: math.log(2 * math.exp(r) / (1 + math.exp(r)))  # noqa: E731
        return f(RW[i]) - f(RL[i])
    return (1 - math.exp(-alpha * RW[i])) / alpha - (1 - math.exp(-alpha * RL[i])) / alpha


@pytest.mark.parametrize("name", sorted(HAND))
def test_each_objective_matches_its_formula(name):
    params, expected = HAND[name]
    loss = build_loss({"name": name.removesuffix("_pair") if name == "sft_pair" else name, **params})
    losses, chosen, rejected = loss(POLICY, REFERENCE)
    torch.testing.assert_close(losses, per_pair(expected).float(), rtol=1e-5, atol=1e-6)
    assert chosen.shape == rejected.shape == (2,)


@pytest.mark.parametrize("kind, alpha", [("forward_kl", 1.0), ("js_divergence", 1.0), ("alpha_divergence", 0.5)])
def test_f_divergence_dpo_matches_its_formula(kind, alpha):
    losses, _, _ = DPOLoss(beta=0.5, divergence=kind, alpha=alpha)(POLICY, REFERENCE)
    torch.testing.assert_close(losses, per_pair(lambda i: -logsig(0.5 * divergence_margin(kind, alpha, i))).float())


def with_tokens(
    outputs: ChosenRejectedOutputs, chosen: list[list[float]], rejected: list[list[float]]
) -> ChosenRejectedOutputs:
    """`outputs` with per-token log-probs (padded, masked) whose sums are its sequence log-probs."""

    def pad(rows):
        width = max(map(len, rows))
        return (
            torch.tensor([r + [0.0] * (width - len(r)) for r in rows]),
            torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows]),
        )

    (cw, cm), (rw, rm) = pad(chosen), pad(rejected)
    return ChosenRejectedOutputs(
        chosen_logps=cw.sum(-1),
        rejected_logps=rw.sum(-1),
        chosen_tokens=cm.sum(-1),
        rejected_tokens=rm.sum(-1),
        chosen_token_logps=cw,
        rejected_token_logps=rw,
        chosen_token_mask=cm,
        rejected_token_mask=rm,
    )


POLICY_TOKENS = with_tokens(POLICY, [[-1.0, -2.0, -3.0, -4.0], [-0.5, -1.5]], [[-2.0, -1.0], [-3.0, -0.25, -0.75]])
REFERENCE_TOKENS = with_tokens(REFERENCE, [[-1.5, -1.0, -3.5, -2.0], [-1.0, -1.0]], [[-1.0, -1.5], [-2.0, -1.0, -1.0]])


def test_ld_dpo_weights_the_tokens_past_the_shorter_completion_by_alpha():
    alpha, beta = 0.25, 0.5

    def desensitised(chosen, rejected):
        public = min(len(chosen), len(rejected))
        weigh = lambda seq: sum(seq[:public]) + alpha * sum(seq[public:])  # noqa: E731
        return weigh(chosen), weigh(rejected)

    expected = []
    for pi, ref in (
        (([-1.0, -2.0, -3.0, -4.0], [-2.0, -1.0]), ([-1.5, -1.0, -3.5, -2.0], [-1.0, -1.5])),
        (([-0.5, -1.5], [-3.0, -0.25, -0.75]), ([-1.0, -1.0], [-2.0, -1.0, -1.0])),
    ):
        (pw, pl), (rw, rl) = desensitised(*pi), desensitised(*ref)
        expected.append(-logsig(beta * ((pw - rw) - (pl - rl))))
    loss = build_loss({"name": "ld_dpo", "beta": beta, "alpha": alpha})
    assert loss.needs_per_token_reference
    losses, _, _ = loss(POLICY_TOKENS, REFERENCE_TOKENS)
    torch.testing.assert_close(losses, torch.tensor(expected))
    with pytest.raises(DpokitError, match="ld_dpo needs per-token reference log-probs"):
        loss(POLICY_TOKENS, REFERENCE)


def test_wpo_weights_each_pair_by_the_policys_own_token_probabilities():
    norms = ([[-0.5, -0.2, -1.0, -0.3], [-0.1, -0.4]], [[-0.6, -0.9], [-0.2, -0.3, -0.05]])
    policy = POLICY_TOKENS
    policy.token_stats = {
        "log_sq_norm": (
            with_tokens(POLICY, *norms).chosen_token_logps,
            with_tokens(POLICY, *norms).rejected_token_logps,
        )
    }
    loss = build_loss({"name": "wpo", "beta": 0.5})
    assert loss.token_stats == ("log_sq_norm",)
    losses, _, _ = loss(policy, REFERENCE_TOKENS)
    chosen = ([-1.0, -2.0, -3.0, -4.0], [-0.5, -1.5])
    rejected = ([-2.0, -1.0], [-3.0, -0.25, -0.75])
    expected = []
    for i in range(2):
        w_w = sum(lp - n for lp, n in zip(chosen[i], norms[0][i])) / len(chosen[i])
        w_l = sum(lp - n for lp, n in zip(rejected[i], norms[1][i])) / len(rejected[i])
        h = (sum(chosen[i]) - sum(REFERENCE_TOKENS.chosen_token_logps[i].tolist())) - (
            sum(rejected[i]) - sum(REFERENCE_TOKENS.rejected_token_logps[i].tolist())
        )
        expected.append(-logsig(0.5 * h) * min(1.0, math.exp(w_w + w_l)))
    torch.testing.assert_close(losses, torch.tensor(expected))


def test_a_list_of_losses_can_be_written_with_commas():
    assert list(build_loss({"name": "dpo,sft", "weights": "1.0,0.5"}).terms) == ["dpo", "sft"]


def test_a_weighted_combination_sums_its_terms_and_keeps_each_for_the_metrics():
    loss = build_loss({"name": ["dpo", "sft"], "weights": [1.0, 0.5], "beta": 0.1})
    losses, chosen, rejected = loss(POLICY, REFERENCE)
    dpo, dpo_chosen, _ = DPOLoss(beta=0.1)(POLICY, REFERENCE)
    sft, _, _ = build_loss({"name": "sft"})(POLICY, None)
    torch.testing.assert_close(losses, dpo + 0.5 * sft)
    torch.testing.assert_close(chosen, dpo_chosen)  # the first term's rewards
    assert list(loss.term_values) == ["dpo", "sft"]
    torch.testing.assert_close(loss.term_values["sft"], sft)
    assert not loss.is_reference_free


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": ["dpo", "sft"], "weights": [1.0]}, "loss.weights must list one number per loss"),
        ({"name": ["dpo", "sft"], "gamma": 1.0}, r"no loss in \['dpo', 'sft'\] has the parameter gamma"),
        ({"name": "dpo", "weights": [1.0]}, "loss.weights is for a list of losses"),
        ({"name": "dpo", "divergence": "kl"}, "loss.divergence='kl' is not valid; choose one of: reverse_kl"),
    ],
)
def test_bad_loss_settings_are_one_clear_line(spec, message):
    with pytest.raises(DpokitError, match=message):
        build_loss(spec)


def test_a_loss_that_returns_a_scalar_or_wrong_shapes_is_named():
    from dpokit.losses import check_loss_outputs

    loss = DPOLoss()
    with pytest.raises(DpokitError, match=r"loss DPOLoss returned shapes \(\), \(2,\), \(2,\).*each must be \[2\]"):
        check_loss_outputs(loss, (torch.tensor(0.5), torch.zeros(2), torch.zeros(2)), 2)
    with pytest.raises(DpokitError, match="returned Tensor; a loss's forward must return"):
        check_loss_outputs(loss, torch.zeros(2), 2)
