"""Weighted sums of losses: ``loss.name=[dpo,sft] loss.weights=[1.0,0.5]``, each term logged on its own."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from dpokit.types import ChosenRejectedOutputs


class CombinedLoss(nn.Module):
    """``sum_i weight_i * term_i`` per pair; the rewards are the first term's.

    After each call, `term_values` holds every term's own (unweighted, detached) per-pair values by name;
    the recipe logs them as ``loss/<name>``.
    """

    def __init__(self, terms: dict[str, nn.Module], weights: list[float]):
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        self.weights = list(weights)
        self.is_reference_free = all(getattr(t, "is_reference_free", False) for t in terms.values())
        self.needs_per_token_reference = any(getattr(t, "needs_per_token_reference", False) for t in terms.values())
        self.token_stats = tuple(dict.fromkeys(s for t in terms.values() for s in getattr(t, "token_stats", ())))
        self.term_values: dict[str, Tensor] = {}

    def forward(self, policy: ChosenRejectedOutputs, reference: Optional[ChosenRejectedOutputs]):
        total, rewards = None, None
        self.term_values = {}
        for (name, term), weight in zip(self.terms.items(), self.weights):
            losses, chosen_rewards, rejected_rewards = term(policy, reference)
            self.term_values[name] = losses.detach()
            total = weight * losses if total is None else total + weight * losses
            if rewards is None:
                rewards = (chosen_rewards, rejected_rewards)
        return total, rewards[0], rewards[1]
