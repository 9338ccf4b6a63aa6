"""Objectives over ranked groups equal their formulas: pairing rules on hand examples, every pairwise loss on the
pairs a rule picks equal to the same loss on a hand-built list of those pairs (values and gradients), the
listwise losses against hand computations, and the rank metrics."""

from __future__ import annotations

import math
from typing import Optional

import pytest
import torch

from dpokit.errors import DpokitError
from dpokit.losses import (
    BCOLoss,
    ChosenRejectedOutputs,
    CombinedLoss,
    DPOLoss,
    LiPOLambdaLoss,
    PlackettLuceLoss,
    RankedOutputs,
    RankedPairwiseLoss,
    build_loss,
    check_ranked_loss_outputs,
    pairs_of,
    ranked_pairs,
)
from dpokit.metrics import RankMetrics

F64 = torch.float64


def ranked(logps, sizes, scores=None, **fields) -> RankedOutputs:
    """RankedOutputs from plain lists (float64)."""
    logps = logps if isinstance(logps, torch.Tensor) else torch.tensor(logps, dtype=F64)
    scores = None if scores is None else torch.tensor(scores, dtype=F64)
    return RankedOutputs(logps=logps, group_sizes=tuple(sizes), scores=scores, **fields)


def hand_pairs(outputs: RankedOutputs, pairs: list[tuple[int, int]]) -> ChosenRejectedOutputs:
    """The pairs listed by hand, each side stacked row by row (no `pairs_of`)."""

    def rows(values: Optional[torch.Tensor], side: int) -> Optional[torch.Tensor]:
        return None if values is None else torch.stack([values[pair[side]] for pair in pairs])

    return ChosenRejectedOutputs(
        chosen_logps=rows(outputs.logps, 0),
        rejected_logps=rows(outputs.logps, 1),
        chosen_tokens=rows(outputs.tokens, 0),
        rejected_tokens=rows(outputs.tokens, 1),
        chosen_token_logps=rows(outputs.token_logps, 0),
        rejected_token_logps=rows(outputs.token_logps, 1),
        chosen_token_mask=rows(outputs.token_mask, 0),
        rejected_token_mask=rows(outputs.token_mask, 1),
        token_stats={name: (rows(v, 0), rows(v, 1)) for name, v in outputs.token_stats.items()},
    )


def test_all_pairs_dpo_on_a_group_of_four_equals_mean_dpo_over_its_six_pairs_with_the_same_gradients():
    scores = [2.0, 4.0, 1.0, 3.0]
    reference = ranked([-11.0, -9.5, -12.0, -10.0], [4])
    pairs = [(1, 0), (1, 2), (1, 3), (0, 2), (3, 0), (3, 2)]  # every i above j
    logps = torch.tensor([-10.0, -9.0, -13.0, -10.5], dtype=F64, requires_grad=True)
    (loss,), rewards = RankedPairwiseLoss(DPOLoss(beta=0.5))(ranked(logps, [4], scores), reference)
    (grad,) = torch.autograd.grad(loss, logps)

    expanded = torch.tensor([-10.0, -9.0, -13.0, -10.5], dtype=F64, requires_grad=True)
    losses, _, _ = DPOLoss(beta=0.5)(hand_pairs(ranked(expanded, [4]), pairs), hand_pairs(reference, pairs))
    (expected_grad,) = torch.autograd.grad(losses.mean(), expanded)
    torch.testing.assert_close(loss, losses.mean(), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)
    # DPO's reward is beta * log-ratio on either side, so each completion's mean over its pairs is its own
    torch.testing.assert_close(rewards, 0.5 * (logps.detach() - reference.logps))


def test_all_pairs_over_a_batch_of_groups_with_ties_match_a_hand_built_list():
    sizes, scores = [4, 2, 3], [3.0, 1.0, 2.0, 2.0, 5.0, 5.0, 1.0, 2.0, 3.0]
    values = [-10.0, -12.0, -11.0, -9.0, -8.0, -8.5, -13.0, -12.5, -11.0]
    reference = ranked([-10.5, -11.0, -11.5, -10.0, -8.0, -8.0, -12.0, -12.0, -12.0], sizes)
    by_group = [[(0, 1), (0, 2), (0, 3), (2, 1), (3, 1)], [], [(7, 6), (8, 6), (8, 7)]]  # ties never pair
    logps = torch.tensor(values, dtype=F64, requires_grad=True)
    losses, rewards = RankedPairwiseLoss(DPOLoss(beta=0.2))(ranked(logps, sizes, scores), reference)
    (grad,) = torch.autograd.grad(losses.sum(), logps)

    expanded = torch.tensor(values, dtype=F64, requires_grad=True)
    expected = []
    for pairs in by_group:
        if not pairs:
            expected.append(expanded.sum() * 0)
            continue
        pair_losses, _, _ = DPOLoss(beta=0.2)(hand_pairs(ranked(expanded, sizes), pairs), hand_pairs(reference, pairs))
        expected.append(pair_losses.mean())
    expected = torch.stack(expected)
    (expected_grad,) = torch.autograd.grad(expected.sum(), expanded)
    torch.testing.assert_close(losses, expected.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)
    assert losses[1] == 0 and torch.isnan(rewards[4:6]).all()  # the tied group: no pair, no rewards


SIZES, SCORES = (4, 2, 3), torch.tensor([3.0, 1.0, 2.0, 2.0, 5.0, 5.0, 1.0, 2.0, 3.0])


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("all", [(0, 1), (0, 2), (0, 3), (2, 1), (3, 1), (7, 6), (8, 6), (8, 7)]),
        ("best_worst", [(0, 1), (8, 6)]),
        ("best_rest", [(0, 1), (0, 2), (0, 3), (8, 6), (8, 7)]),
        ("adjacent", [(0, 2), (0, 3), (2, 1), (3, 1), (7, 6), (8, 7)]),  # levels 3 > 2 (two tied) > 1; 3 > 2 > 1
    ],
)
def test_each_pairing_rule_picks_its_pairs_and_never_pairs_a_tie(rule, expected):
    chosen, rejected, group = ranked_pairs(SCORES, SIZES, rule)
    assert list(zip(chosen.tolist(), rejected.tolist())) == expected
    assert group.tolist() == [0 if c < 4 else 2 for c, _ in expected]
    assert chosen.dtype == rejected.dtype == group.dtype == torch.long


def test_best_worst_and_best_rest_take_the_first_of_tied_bests_and_worsts():
    chosen, rejected, _ = ranked_pairs(torch.tensor([1.0, 4.0, 4.0, 1.0]), [4], "best_worst")
    assert (chosen.tolist(), rejected.tolist()) == ([1], [0])
    chosen, rejected, _ = ranked_pairs(torch.tensor([1.0, 4.0, 4.0, 1.0]), [4], "best_rest")
    assert (chosen.tolist(), rejected.tolist()) == ([1, 1], [0, 3])


def test_ranked_pairs_refuses_scores_that_do_not_match_the_groups_and_unknown_rules():
    with pytest.raises(DpokitError, match=r"scores has shape \(3,\), the groups \(2, 2\) hold 4 completions"):
        ranked_pairs(torch.zeros(3), [2, 2])
    with pytest.raises(DpokitError, match=r"loss.pairs='top' is not valid; choose one of: all, best_worst, best_rest"):
        ranked_pairs(torch.zeros(4), [2, 2], "top")


def test_gap_weighting_weights_each_pair_by_its_score_gap():
    policy = ranked([-10.0, -12.0, -11.0], [3], [3.0, 1.0, 2.0])
    reference = ranked([-11.0, -11.0, -11.0], [3])
    (loss,), _ = RankedPairwiseLoss(DPOLoss(beta=1.0), gap_weighted=True)(policy, reference)
    r = [1.0, -1.0, 0.0]  # log-ratios

    def dpo(i, j):
        return math.log1p(math.exp(-(r[i] - r[j])))

    expected = (2 * dpo(0, 1) + 1 * dpo(0, 2) + 1 * dpo(2, 1)) / 4  # gaps 2, 1, 1
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_best_worst_rewards_are_nan_for_the_middle_completion_and_the_pair_rewards_elsewhere():
    policy = ranked([-10.0, -12.0, -11.0], [3], [3.0, 1.0, 2.0])
    reference = ranked([-11.0, -11.0, -11.0], [3])
    (loss,), rewards = RankedPairwiseLoss(DPOLoss(beta=0.5), pairs="best_worst")(policy, reference)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.5 * 2.0)), abs=1e-12)
    assert rewards[0].item() == pytest.approx(0.5) and rewards[1].item() == pytest.approx(-0.5)
    assert torch.isnan(rewards[2])


def test_a_batch_whose_groups_all_tie_has_zero_losses_that_still_backpropagate():
    logps = torch.tensor([-10.0, -11.0, -12.0, -13.0], dtype=F64, requires_grad=True)
    losses, rewards = RankedPairwiseLoss(DPOLoss())(ranked(logps, [2, 2], [1.0, 1.0, 2.0, 2.0]), ranked(logps, [2, 2]))
    losses.sum().backward()
    assert losses.tolist() == [0.0, 0.0] and torch.isnan(rewards).all() and logps.grad.eq(0).all()


def per_token_outputs(requires_grad: bool = False) -> tuple[RankedOutputs, torch.Tensor]:
    """Two groups (3 and 4 completions, one tie) with per-token log-probs, masks and WPO's token statistic."""
    torch.manual_seed(0)
    lengths = torch.tensor([3, 5, 2, 4, 4, 1, 3])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    token_logps = (-torch.rand(7, 5, dtype=F64) * 2 - 0.05).masked_fill(~mask, 0.0).requires_grad_(requires_grad)
    norm = (-torch.rand(7, 5, dtype=F64)).masked_fill(~mask, 0.0)
    outputs = RankedOutputs(
        logps=token_logps.sum(-1),
        group_sizes=(3, 4),
        scores=torch.tensor([0.2, 0.9, 0.5, 4.0, 1.0, 4.0, 2.0]),
        tokens=lengths,
        token_logps=token_logps,
        token_mask=mask,
        token_stats={"log_sq_norm": norm},
    )
    return outputs, token_logps


PER_TOKEN_PAIRS = [[(1, 0), (1, 2), (2, 0)], [(3, 4), (3, 6), (5, 4), (5, 6), (6, 4)]]


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "simpo"},
        {"name": "orpo", "sft_weight": 0.5},
        {"name": "wpo", "beta": 0.3},
        {"name": ["dpo", "sft"], "weights": [1.0, 0.5]},
        {"name": "ld_dpo"},
    ],
    ids=lambda spec: str(spec["name"]),
)
def test_every_pairwise_loss_runs_unchanged_on_the_pairs_with_per_token_values(spec):
    policy, token_logps = per_token_outputs(requires_grad=True)
    reference, _ = per_token_outputs()
    reference.logps = reference.logps - 0.3 * torch.arange(7, dtype=F64)  # some nonzero log-ratios
    loss = build_loss(spec, shape="ranked")
    assert isinstance(loss, RankedPairwiseLoss)
    losses, _ = loss(policy, reference)
    (grad,) = torch.autograd.grad(losses.sum(), token_logps)

    expanded, expanded_token_logps = per_token_outputs(requires_grad=True)
    pairs = [pair for group in PER_TOKEN_PAIRS for pair in group]
    pair_loss = build_loss(spec)  # the same loss on pair data
    pair_losses, _, _ = pair_loss(hand_pairs(expanded, pairs), hand_pairs(reference, pairs))
    expected = torch.stack([pair_losses[:3].mean(), pair_losses[3:].mean()])
    (expected_grad,) = torch.autograd.grad(expected.sum(), expanded_token_logps)
    torch.testing.assert_close(losses, expected.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-6, rtol=0)
    if isinstance(pair_loss, CombinedLoss):  # each term logged per group, reduced like the loss
        assert list(loss.term_values) == ["dpo", "sft"]
        for name, values in pair_loss.term_values.items():
            torch.testing.assert_close(loss.term_values[name], torch.stack([values[:3].mean(), values[3:].mean()]))


def test_pairs_of_gathers_every_per_completion_value():
    policy, _ = per_token_outputs()
    policy.mean_logits = torch.arange(7, dtype=F64)
    policy.router_aux_loss = torch.tensor(0.25)
    pairs = pairs_of(policy, torch.tensor([1, 5]), torch.tensor([0, 6]))
    assert pairs.chosen_logits.tolist() == [1.0, 5.0] and pairs.rejected_logits.tolist() == [0.0, 6.0]
    assert pairs.chosen_tokens.tolist() == [5, 1] and pairs.rejected_tokens.tolist() == [3, 3]
    torch.testing.assert_close(pairs.rejected_token_logps, policy.token_logps[[0, 6]])
    torch.testing.assert_close(pairs.token_stats["log_sq_norm"][0], policy.token_stats["log_sq_norm"][[1, 5]])
    assert pairs.chosen_token_mask.dtype == torch.bool and pairs.router_aux_loss is policy.router_aux_loss


def test_the_wrapper_passes_the_wrapped_losss_attributes_state_and_mode_through():
    wrapped = RankedPairwiseLoss(BCOLoss())
    assert set(wrapped.state_dict()) == {"loss.reward_sum", "loss.reward_count"}  # saved in checkpoints
    policy = ranked([-10.0, -12.0, -11.0], [3], [3.0, 1.0, 2.0])
    reference = ranked([-11.0, -11.0, -11.0], [3])
    wrapped.eval()
    wrapped(policy, reference)
    assert wrapped.loss.reward_count.item() == 0  # running statistics learn from training batches only
    wrapped.train()
    wrapped(policy, reference)
    assert wrapped.loss.reward_count.item() == 6  # three pairs, two rewards each
    fresh = RankedPairwiseLoss(BCOLoss())
    fresh.load_state_dict(wrapped.state_dict())
    assert fresh.loss.reward_count.item() == 6
    assert RankedPairwiseLoss(build_loss({"name": "simpo"})).is_reference_free
    assert RankedPairwiseLoss(build_loss({"name": "ld_dpo"})).needs_per_token_reference
    assert RankedPairwiseLoss(build_loss({"name": "dpo", "wpo": True})).token_stats == ("log_sq_norm",)
    assert not RankedPairwiseLoss(DPOLoss()).is_reference_free


@pytest.mark.parametrize("loss_class", [PlackettLuceLoss, LiPOLambdaLoss])
def test_listwise_losses_return_one_loss_per_group_and_one_reward_per_completion(loss_class):
    logps = torch.tensor([-10.0, -12.0, -11.0, -9.0, -8.0], dtype=F64, requires_grad=True)
    policy = ranked(logps, [3, 2], [3.0, 1.0, 2.0, 0.5, 1.5])
    losses, rewards = check_ranked_loss_outputs(
        loss_class(), loss_class()(policy, ranked([-11.0] * 5, [3, 2])), num_groups=2, num_completions=5
    )
    losses.sum().backward()
    assert torch.isfinite(logps.grad).all() and logps.grad.abs().sum() > 0
    torch.testing.assert_close(rewards, 0.1 * (logps.detach() + 11.0))


def test_plackett_luce_is_ln_k_factorial_per_group_when_every_reward_is_zero():
    sizes = [2, 3, 4, 5, 6]
    logps = torch.linspace(-20, -10, sum(sizes), dtype=F64)
    scores = [float(s) for k in sizes for s in torch.randperm(k, generator=torch.Generator().manual_seed(k))]
    losses, rewards = PlackettLuceLoss()(ranked(logps, sizes, scores), ranked(logps, sizes))
    torch.testing.assert_close(losses, torch.tensor([math.log(math.factorial(k)) for k in sizes], dtype=F64))
    assert rewards.eq(0).all()


def logsumexp(*values: float) -> float:
    return math.log(sum(math.exp(v) for v in values))


def test_plackett_luce_matches_the_ranking_likelihood_by_hand():
    policy = ranked([-10.0, -12.0, -11.0], [3], [1.0, 3.0, 2.0])  # order by score: 1, 2, 0
    reference = ranked([-11.0, -11.5, -11.0], [3])
    (loss,), _ = PlackettLuceLoss(beta=0.5)(policy, reference)
    r0, r1, r2 = 0.5 * 1.0, 0.5 * -0.5, 0.5 * 0.0
    expected = -((r1 - logsumexp(r1, r2, r0)) + (r2 - logsumexp(r2, r0)) + 0.0)
    assert loss.item() == pytest.approx(expected, abs=1e-12)


def test_plackett_luce_on_two_completions_is_dpo():
    policy = ranked([-10.0, -12.0], [2], [1.0, 0.0])
    reference = ranked([-11.0, -11.5], [2])
    (loss,), _ = PlackettLuceLoss(beta=0.3)(policy, reference)
    (dpo,), _, _ = DPOLoss(beta=0.3)(
        pairs_of(policy, torch.tensor([0]), torch.tensor([1])), hand_pairs(reference, [(0, 1)])
    )
    assert loss.item() == pytest.approx(dpo.item(), abs=1e-12)


def test_plackett_luce_ties_follow_breslow_each_tied_completion_against_its_level_and_below():
    policy = ranked([-10.0, -12.0, -11.0], [3], [2.0, 2.0, 1.0])
    reference = ranked([-11.0, -11.0, -11.0], [3])
    (loss,), _ = PlackettLuceLoss(beta=1.0)(policy, reference)
    a, b, c = 1.0, -1.0, 0.0
    expected = -((a - logsumexp(a, b, c)) + (b - logsumexp(a, b, c)) + 0.0)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    swapped, _ = PlackettLuceLoss(beta=1.0)(ranked([-12.0, -10.0, -11.0], [3], [2.0, 2.0, 1.0]), reference)
    assert swapped.item() == pytest.approx(expected, abs=1e-12)  # the order within a tie does not matter


def test_lipo_lambda_matches_the_lambda_weighted_logistic_loss_by_hand():
    logps = torch.tensor([-10.7, -10.5, -11.2], dtype=F64, requires_grad=True)
    policy = ranked(logps, [3], [2.0, 0.0, 1.0])  # gains 3, 0, 1
    reference = ranked([-11.0, -11.0, -11.0], [3])
    (loss,), _ = LiPOLambdaLoss(beta=1.0)(policy, reference)
    (grad,) = torch.autograd.grad(loss, logps)
    r = [0.3, 0.5, -0.2]  # ranks by reward: 2, 1, 3
    inverse_discount = [1 / math.log2(3), 1.0, 1 / math.log2(4)]
    gain = [3.0, 0.0, 1.0]
    pairs = [(0, 1), (0, 2), (2, 1)]
    delta = {(i, j): abs(gain[i] - gain[j]) * abs(inverse_discount[i] - inverse_discount[j]) for i, j in pairs}
    expected = sum(delta[i, j] * math.log1p(math.exp(-(r[i] - r[j]))) for i, j in pairs)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    expected_grad = [0.0, 0.0, 0.0]  # Delta is a constant: d/dr_i of log(1 + e^-(r_i - r_j)) = -sigma(r_j - r_i)
    for i, j in pairs:
        pull = delta[i, j] / (1 + math.exp(r[i] - r[j]))
        expected_grad[i] -= pull
        expected_grad[j] += pull
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=F64))


def test_rank_metrics_on_a_hand_example():
    policy = ranked([-10.0, -12.0, -11.0, -9.0, -8.0], [3, 2], [3.0, 1.0, 2.0, 1.0, 2.0])
    policy.mean_logits = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=F64)
    rewards = torch.tensor([0.5, 0.1, -0.2, -1.0, 1.0], dtype=F64)
    metrics = RankMetrics()
    metrics.add(torch.tensor([0.6, 0.2], dtype=F64), rewards, policy, num_tokens=40)
    means = metrics.means()
    # group 0: pairs (0,1) right, (0,2) right, (2,1) wrong; group 1: (4,3) right
    assert means["rewards/accuracies"] == pytest.approx(3 / 4)
    assert means["rewards/ranking_accuracy"] == pytest.approx(1 / 2)
    assert means["rewards/margins"] == pytest.approx(((0.5 - 0.1) + (1.0 + 1.0)) / 2)
    # group 0: normalised scores 1, 0, 0.5 -> gains 1, 0, sqrt(2) - 1; reward order 0, 1, 2
    g = math.sqrt(2) - 1
    ndcg_0 = (1 + 0 + g / 2) / (1 + g / math.log2(3))
    assert means["rewards/ndcg"] == pytest.approx((ndcg_0 + 1.0) / 2)
    assert means["loss"] == pytest.approx(0.4)
    assert (means["rewards/best"], means["rewards/worst"]) == pytest.approx(((0.5 + 1.0) / 2, (0.1 - 1.0) / 2))
    assert (means["logps/best"], means["logps/worst"]) == pytest.approx(((-10.0 - 8.0) / 2, (-12.0 - 9.0) / 2))
    assert (means["logits/best"], means["logits/worst"]) == pytest.approx(((1.0 + 5.0) / 2, (2.0 + 4.0) / 2))
    assert (metrics.num_pairs, metrics.num_tokens) == (2, 40) and "router_aux_loss" not in means


def test_rank_metrics_leave_out_completions_no_pair_used_and_start_at_the_worst_order():
    policy = ranked([-10.0, -12.0, -11.0], [3], [3.0, 1.0, 2.0])
    metrics = RankMetrics()
    metrics.add(torch.tensor([0.3], dtype=F64), torch.tensor([0.5, 0.1, float("nan")], dtype=F64), policy, 10)
    means = metrics.means()
    assert (means["rewards/accuracies"], means["rewards/ndcg"], means["rewards/ranking_accuracy"]) == (1.0, 1.0, 1.0)
    at_step_one = RankMetrics()  # every reward 0: no pair is right, and ties rank the worse score first
    at_step_one.add(torch.tensor([0.3], dtype=F64), torch.zeros(3, dtype=F64), policy, 10)
    means = at_step_one.means()
    g = math.sqrt(2) - 1
    assert (means["rewards/accuracies"], means["rewards/margins"]) == (0.0, 0.0)
    assert means["rewards/ndcg"] == pytest.approx((0 + g / math.log2(3) + 1 / 2) / (1 + g / math.log2(3)))


def test_rank_metrics_sum_over_micro_batches_and_carry_terms_and_the_router_term():
    policy = ranked([-10.0, -12.0], [2], [1.0, 0.0])
    policy.router_aux_loss = torch.tensor(0.5, dtype=F64)
    metrics = RankMetrics()
    for loss in (0.2, 0.4):
        metrics.add(
            torch.tensor([loss], dtype=F64),
            torch.tensor([0.1, 0.0], dtype=F64),
            policy,
            5,
            {"sft": torch.tensor([loss])},
        )
    means = metrics.means()
    assert means["loss"] == pytest.approx(0.3) and means["loss/sft"] == pytest.approx(0.3)
    assert means["router_aux_loss"] == pytest.approx(0.5) and metrics.sums[0].item() == pytest.approx(0.6)
    assert metrics.all_reduce(torch.ones(2)).tolist() == [1.0, 1.0]  # one process: a no-op that returns extra


def test_build_loss_wraps_pairwise_losses_for_ranked_data_and_passes_listwise_ones_as_they_are():
    loss = build_loss({"name": "dpo", "beta": 0.2, "pairs": "adjacent", "gap_weighted": True}, shape="ranked")
    assert isinstance(loss, RankedPairwiseLoss) and isinstance(loss.loss, DPOLoss) and loss.loss.beta == 0.2
    assert (loss.pairs, loss.gap_weighted) == ("adjacent", True)
    assert build_loss({"name": "dpo"}, shape="ranked").pairs == "all"
    assert isinstance(build_loss({"name": ["dpo", "sft"]}, shape="ranked").loss, CombinedLoss)
    assert isinstance(build_loss({"name": "plackett_luce", "beta": 0.5}, shape="ranked"), PlackettLuceLoss)
    assert isinstance(build_loss({"name": "dpokit.losses:LiPOLambdaLoss"}, shape="ranked"), LiPOLambdaLoss)
    # data not known yet (a config being checked): ranked-only keys and listwise losses pass
    assert isinstance(build_loss({"name": "dpo", "pairs": "best_worst"}, shape=None), RankedPairwiseLoss)
    assert isinstance(build_loss({"name": "lipo"}, shape=None), LiPOLambdaLoss)
    assert isinstance(build_loss({"name": "dpo"}, shape=None), DPOLoss)


@pytest.mark.parametrize(
    "spec, ranked_data, message",
    [
        (
            {"name": "plackett_luce"},
            False,
            r"loss 'plackett_luce' is listwise: it needs ranked data \(prepared from k completions per prompt\); "
            r"this data is pairs: choose a pairwise loss such as dpo",
        ),
        (
            {"name": "dpo", "pairs": "best_worst"},
            False,
            r"loss.pairs applies to ranked data \(prepared from k completions per prompt\); this data is pairs: "
            r"remove it",
        ),
        ({"name": "dpo", "gap_weighted": True}, False, r"loss.gap_weighted applies to ranked data"),
        (
            {"name": "lipo", "pairs": "all"},
            True,
            r"loss.pairs applies to pairwise losses on ranked data; loss 'lipo' is listwise .*: remove loss.pairs",
        ),
        (
            {"name": ["plackett_luce", "sft"]},
            True,
            r"plackett_luce is listwise \(one loss per group, not per pair\) and does not combine in a weighted list; "
            r"use it alone \(loss.name=plackett_luce\)",
        ),
        ({"name": "dpo", "pairs": "top2"}, True, r"loss.pairs='top2' is not valid; choose one of: all, best_worst"),
        ({"name": "dpo", "gap_weighted": "yes"}, None, r"loss.gap_weighted must be true or false, got 'yes'"),
        ({"name": "lipo", "beta": -1}, True, r"loss.beta=-1 is out of range; it must be > 0"),
        ({"name": "lipo", "tau": 1}, True, r"loss 'lipo' has no parameter tau; its parameters: loss.beta"),
    ],
)
def test_build_loss_refuses_ranked_settings_that_do_not_fit_the_data(spec, ranked_data, message):
    with pytest.raises(DpokitError, match=message):
        build_loss(spec, shape={True: "ranked", False: "pairs", None: None}[ranked_data])


def test_check_ranked_loss_outputs_names_the_loss_and_the_shapes_it_wants():
    loss = DPOLoss()
    with pytest.raises(DpokitError, match=r"loss DPOLoss returned 3 values on ranked data; .* losses of shape \[2\]"):
        check_ranked_loss_outputs(loss, (torch.zeros(2), torch.zeros(5), torch.zeros(5)), 2, 5)
    with pytest.raises(
        DpokitError, match=r"returned shapes \(\), \(5,\) on ranked data; it must return .*not their mean"
    ):
        check_ranked_loss_outputs(loss, (torch.tensor(0.5), torch.zeros(5)), 2, 5)
    with pytest.raises(DpokitError, match=r"returned Tensor on ranked data"):
        check_ranked_loss_outputs(loss, torch.zeros(2), 2, 5)
    losses, rewards = check_ranked_loss_outputs(loss, (torch.zeros(2), torch.zeros(5)), 2, 5)
    assert losses.shape == (2,) and rewards.shape == (5,)


def test_a_pairwise_loss_that_returns_the_wrong_shape_on_ranked_pairs_is_named():
    class MeanDPO(torch.nn.Module):
        def forward(self, policy, reference):
            losses, chosen, rejected = DPOLoss()(policy, reference)
            return losses.mean(), chosen, rejected

    policy = ranked([-10.0, -12.0, -11.0], [3], [3.0, 1.0, 2.0])
    with pytest.raises(DpokitError, match=r"loss MeanDPO returned shapes \(\), \(3,\), \(3,\) .* each must be \[3\]"):
        RankedPairwiseLoss(MeanDPO())(policy, ranked([-11.0] * 3, [3]))


def test_the_pairs_a_rule_picks_carry_their_completions_scores():
    scores = torch.tensor([3.0, 1.0, 2.0, 0.5, 0.5])
    outputs = RankedOutputs(logps=torch.arange(5.0), group_sizes=(3, 2), scores=scores)
    chosen, rejected, _ = ranked_pairs(scores, (3, 2), "all")
    pairs = pairs_of(outputs, chosen, rejected)
    assert pairs.chosen_scores.tolist() == scores[chosen].tolist()
    assert pairs.rejected_scores.tolist() == scores[rejected].tolist()
    assert bool((pairs.chosen_scores > pairs.rejected_scores).all())  # ties never pair
