"""Objectives over ranked groups: a prompt with k_g >= 2 completions, each with a score (higher is better, equal
scores tie), as `RankedOutputs` (`dpokit.types`).

Two kinds, both ``forward(policy, reference) -> (losses [G], rewards [C])``:

- `RankedPairwiseLoss` runs any pairwise loss (DPO, IPO, SimPO, ORPO, WPO weighting, a weighted combination, a
  user's own) on the pairs a pairing rule picks from each group (`ranked_pairs`, `pairs_of`), then averages them
  per group. Each completion is computed once by the model; its pairs gather it, and the gradient flows back.
- Listwise losses (``is_listwise = True``) score the whole group at once: `PlackettLuceLoss`, `LiPOLambdaLoss`.

Notation, per completion c: ``r_c = beta * (log pi(y_c) - log ref(y_c))``, ``s_c`` its score. docs/losses.md,
"Ranked data", has the rules and formulas.
"""

from __future__ import annotations

import abc
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpokit.errors import DpokitError
from dpokit.losses.base import BETA_WHY, check_choice, check_flag, check_loss_outputs, check_parameter
from dpokit.ranges import ABOVE_0
from dpokit.types import ChosenRejectedOutputs, RankedOutputs

PAIRING_RULES = ("all", "best_worst", "best_rest", "adjacent")


def ranked_pairs(
    scores: Tensor, group_sizes: Sequence[int], rule: str = "all", device: Optional[torch.device | str] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The (chosen, rejected) pairs `rule` picks in each group, as ``(chosen_index [P], rejected_index [P],
    pair_group [P])``: long tensors indexing the flat ``[C]`` completions, and each pair's group. Ties never pair.

    Rules, within each group: ``all``, every (i, j) with ``s_i > s_j``; ``best_worst``, the first highest-scored
    against the first lowest-scored (none if all tie); ``best_rest``, the first highest-scored against every
    completion scored strictly lower; ``adjacent``, the distinct scores sorted descending into levels, every
    completion of level l against every completion of level l + 1. Pairs are listed by group, then chosen, then
    rejected position.

    Computed on the host (``[G, K, K]`` comparisons): scores already on the host (the batch's, before it moves to
    the device) cost no device read; the indices land on `device` (default: the scores' device).
    """
    check_choice("pairs", rule, PAIRING_RULES)
    device = scores.device if device is None else device
    host = scores.detach().to("cpu", torch.float64)
    sizes = torch.tensor(list(group_sizes), dtype=torch.long)
    if host.dim() != 1 or host.numel() != int(sizes.sum()):
        raise DpokitError(
            f"ranked_pairs: scores has shape {tuple(host.shape)}, the groups {tuple(group_sizes)} hold "
            f"{int(sizes.sum())} completions; give one score per completion"
        )
    k = max(group_sizes, default=0)
    starts = torch.cumsum(sizes, 0) - sizes  # [G]
    position = torch.arange(k)
    real = position < sizes[:, None]  # [G, K]
    flat = (starts[:, None] + position).clamp(max=max(host.numel() - 1, 0))
    s = torch.where(real, host[flat] if host.numel() else torch.zeros(real.shape, dtype=torch.float64), torch.nan)
    better = s[:, :, None] > s[:, None, :]  # [G, i, j]: i scored above j (NaN padding never compares)
    i, j = position[None, :, None], position[None, None, :]
    if rule == "all":
        keep = better
    elif rule in ("best_worst", "best_rest"):
        best = torch.where(real, s, -torch.inf).argmax(-1)[:, None, None]  # the first highest-scored
        keep = better & (i == best)
        if rule == "best_worst":
            keep &= j == torch.where(real, s, torch.inf).argmin(-1)[:, None, None]  # the first lowest-scored
    else:  # adjacent: a completion's level is the number of distinct scores above its own
        earlier = position[None, None, :] < position[None, :, None]  # [1, m, m']: m' before m
        first = real & ~((s[:, :, None] == s[:, None, :]) & earlier).any(-1)  # [G, m]: first of its value
        level = (better.transpose(1, 2) & first[:, None, :]).sum(-1)  # [G, i]: distinct scores above s_i
        keep = better & (level[:, None, :] == level[:, :, None] + 1)
    group, chosen, rejected = keep.nonzero(as_tuple=True)
    return (starts[group] + chosen).to(device), (starts[group] + rejected).to(device), group.to(device)


def pairs_of(outputs: RankedOutputs, chosen_index: Tensor, rejected_index: Tensor) -> ChosenRejectedOutputs:
    """The ``P`` pairs ``(chosen_index[p], rejected_index[p])`` of `outputs`' completions as `ChosenRejectedOutputs`,
    so that every pairwise loss runs unchanged: log-probs, token counts, mean logits, scores, per-token log-probs
    and masks (``[P, T]``, T the batch's longest completion) and token stats gathered; ``router_aux_loss`` passed through.
    The gathers keep the graph: a completion in several pairs gets the sum of their gradients."""

    def pick(values: Optional[Tensor], index: Tensor) -> Optional[Tensor]:
        return None if values is None else values.index_select(0, index.to(values.device))

    ci, ri = chosen_index, rejected_index
    return ChosenRejectedOutputs(
        chosen_logps=pick(outputs.logps, ci),
        rejected_logps=pick(outputs.logps, ri),
        chosen_logits=pick(outputs.mean_logits, ci),
        rejected_logits=pick(outputs.mean_logits, ri),
        chosen_tokens=pick(outputs.tokens, ci),
        rejected_tokens=pick(outputs.tokens, ri),
        router_aux_loss=outputs.router_aux_loss,
        chosen_token_logps=pick(outputs.token_logps, ci),
        rejected_token_logps=pick(outputs.token_logps, ri),
        chosen_token_mask=pick(outputs.token_mask, ci),
        rejected_token_mask=pick(outputs.token_mask, ri),
        token_stats={name: (pick(v, ci), pick(v, ri)) for name, v in outputs.token_stats.items()},
        chosen_scores=pick(outputs.scores, ci),
        rejected_scores=pick(outputs.scores, ri),
    )


def scores_of(policy: RankedOutputs, loss: str) -> Tensor:
    if policy.scores is None:
        raise DpokitError(f"{loss} needs each completion's score: the policy's RankedOutputs has scores=None")
    return policy.scores


class RankedPairwiseLoss(nn.Module):
    """A pairwise loss on ranked groups: per group, the mean of its pairs' losses under a pairing rule
    (`ranked_pairs`; ``pairs``, default ``all``). With ``gap_weighted``, the mean is weighted by each pair's score
    gap ``s_i - s_j``: ``sum(w l) / sum(w)``. A group with no pair (all scores tie) has loss 0.

    Returns ``(losses [G], rewards [C])``: a completion's reward is the mean of its rewards over the pairs it is in
    (the wrapped loss's chosen reward where it is chosen, rejected reward where rejected), NaN for a completion in
    no pair (the middle ones under ``best_worst``). The wrapped loss's attributes (``is_reference_free``,
    ``needs_per_token_reference``, ``token_stats``) pass through; it is a submodule (``loss``), so its state (BCO's
    running mean, as ``loss.reward_sum``...) is saved and restored with the wrapper's and follows its train/eval
    mode. A weighted combination's ``term_values`` are reduced per group the same way.
    """

    is_listwise = False

    def __init__(self, loss: nn.Module, *, pairs: str = "all", gap_weighted: bool = False):
        super().__init__()
        self.loss = loss
        self.pairs = check_choice("pairs", pairs, PAIRING_RULES)
        self.gap_weighted = check_flag("gap_weighted", gap_weighted)
        self.term_values: dict[str, Tensor] = {}

    @property
    def is_reference_free(self) -> bool:
        return bool(getattr(self.loss, "is_reference_free", False))

    @property
    def needs_per_token_reference(self) -> bool:
        return bool(getattr(self.loss, "needs_per_token_reference", False))

    @property
    def token_stats(self) -> tuple[str, ...]:
        return tuple(getattr(self.loss, "token_stats", ()))

    def forward(self, policy: RankedOutputs, reference: Optional[RankedOutputs]) -> tuple[Tensor, Tensor]:
        device, num_groups = policy.logps.device, policy.num_groups
        host = policy.host_scores  # the batch's scores, never read back from the device
        if host is None:
            host = scores_of(policy, "a pairwise loss on ranked data").detach().cpu()
        chosen, rejected, group = ranked_pairs(host, policy.group_sizes, self.pairs)
        gaps = (host[chosen] - host[rejected]).to(device, policy.logps.dtype, non_blocking=True)
        chosen, rejected, group = (t.to(device, non_blocking=True) for t in (chosen, rejected, group))
        num_pairs = int(chosen.numel())
        if num_pairs == 0:  # every group ties: nothing to learn, but keep the graph for backward
            zeros = policy.logps.new_zeros(num_groups) + 0.0 * policy.logps.sum()
            names = list(getattr(self.loss, "terms", {})) if hasattr(self.loss, "term_values") else []
            self.term_values = {name: zeros.detach() for name in names}
            return zeros, policy.logps.new_full((policy.num_completions,), float("nan")).detach()
        pair_reference = None if reference is None else pairs_of(reference, chosen, rejected)
        losses, chosen_rewards, rejected_rewards = check_loss_outputs(
            self.loss, self.loss(pairs_of(policy, chosen, rejected), pair_reference), num_pairs
        )
        weights = gaps if self.gap_weighted else torch.ones_like(gaps)
        weight_sums = weights.new_zeros(num_groups).index_add(0, group, weights)
        weight_sums = torch.where(weight_sums > 0, weight_sums, torch.ones_like(weight_sums))

        def per_group(values: Tensor) -> Tensor:
            w = weights.to(values.dtype)
            return values.new_zeros(num_groups).index_add(0, group, w * values) / weight_sums.to(values.dtype)

        terms = getattr(self.loss, "term_values", None)
        self.term_values = {name: per_group(v).detach() for name, v in terms.items()} if terms else {}
        c = policy.num_completions
        both = torch.cat([chosen, rejected])
        values = torch.cat([chosen_rewards, rejected_rewards]).detach()
        totals = values.new_zeros(c).index_add(0, both, values)
        counts = values.new_zeros(c).index_add(0, both, torch.ones_like(values))
        rewards = torch.where(counts > 0, totals / counts.clamp(min=1), torch.full_like(totals, float("nan")))
        return per_group(losses), rewards


class ListwiseLoss(nn.Module, abc.ABC):
    """Base of the listwise losses: they score each whole group; subclasses define `group_losses` on padded
    ``[G, K]`` rewards ``r = beta * (log pi - log ref)`` and scores. Returns ``(losses [G], rewards [C])``."""

    is_listwise = True
    is_reference_free = False
    needs_per_token_reference = False
    token_stats: tuple[str, ...] = ()

    def __init__(self, *, beta: float = 0.1):
        super().__init__()
        self.beta = check_parameter("beta", beta, ABOVE_0, why=BETA_WHY)

    @abc.abstractmethod
    def group_losses(self, rewards: Tensor, scores: Tensor, real: Tensor) -> Tensor:
        """``[G]`` losses from padded rewards ``[G, K]`` (with grad), scores ``[G, K]`` and the real-entry mask."""

    def forward(self, policy: RankedOutputs, reference: Optional[RankedOutputs]) -> tuple[Tensor, Tensor]:
        name = type(self).__name__
        if reference is None:
            raise DpokitError(f"{name} needs the reference's log-probs (a cache or --ref live)")
        rewards = self.beta * (policy.logps - reference.logps)  # [C]
        padded, real = policy.padded(rewards)
        scores, _ = policy.padded(scores_of(policy, name).to(rewards.device))
        return self.group_losses(padded, scores, real), rewards.detach()


class PlackettLuceLoss(ListwiseLoss):
    """DPO's ranking form (Rafailov et al., 2023, appendix A.3): the Plackett-Luce likelihood of the scores'
    order under the rewards. With completions ordered by score, ``tau(1)`` the best,
    ``-sum_i [r_tau(i) - log sum_{j >= i} exp(r_tau(j))]`` per group; k = 2 is DPO.

    Ties follow Breslow's rule: a completion's denominator runs over every completion of the group scored at
    its own level or lower (tied ones included), so the order within a tie does not matter. Without ties this is
    Plackett-Luce exactly; at step 1 (every r = 0) it is ``ln(k!)`` per group."""

    def group_losses(self, rewards, scores, real):
        k = rewards.shape[1]
        own = torch.eye(k, dtype=torch.bool, device=rewards.device)  # keeps every row's logsumexp finite
        at_or_below = (real[:, None, :] & (scores[:, None, :] <= scores[:, :, None])) | own  # [G, i, j]
        logits = rewards[:, None, :].expand(-1, k, -1).masked_fill(~at_or_below, -torch.inf)
        terms = rewards - torch.logsumexp(logits, dim=-1)  # [G, K]
        return -torch.where(real, terms, torch.zeros_like(terms)).sum(-1)


class LiPOLambdaLoss(ListwiseLoss):
    """LiPO-lambda (Liu et al., 2024, "LiPO: Listwise Preference Optimization through Learning-to-Rank"): the
    LambdaLoss-weighted logistic loss over every pair of the group,
    ``sum_{s_i > s_j} Delta_ij log(1 + exp(-(r_i - r_j)))``, with the lambda weight
    ``Delta_ij = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|`` (detached): gains ``G = 2^s - 1`` from the raw scores
    (computed in float64; keep scores small, e.g. ratings or probabilities), discounts
    ``D(tau) = log2(1 + tau)``, ``tau`` the 1-based rank of each completion by its current reward (descending;
    equal rewards keep the group's order, so at step 1, every r = 0, ``tau`` is the data's order and the loss is
    ``ln 2 * sum Delta_ij``). Tied scores never pair. Summed per group, as the paper's per-list loss."""

    def group_losses(self, rewards, scores, real):
        k = rewards.shape[1]
        with torch.no_grad():
            key = rewards.detach().masked_fill(~real, -torch.inf)
            order = torch.sort(key, dim=-1, descending=True, stable=True).indices
            positions = torch.arange(1, k + 1, device=rewards.device).expand_as(order)
            rank = torch.empty_like(order).scatter_(-1, order, positions)  # [G, K], 1-based
            inverse_discount = 1.0 / torch.log2(1.0 + rank.double())
            gain = torch.exp2(scores.double()) - 1
            delta = (gain[:, :, None] - gain[:, None, :]).abs() * (
                inverse_discount[:, :, None] - inverse_discount[:, None, :]
            ).abs()
            pair = real[:, :, None] & real[:, None, :] & (scores[:, :, None] > scores[:, None, :])
            delta = torch.where(pair, delta, torch.zeros_like(delta)).to(rewards.dtype)
        margins = rewards[:, :, None] - rewards[:, None, :]  # [G, i, j]
        return (delta * F.softplus(-margins)).sum((-1, -2))
