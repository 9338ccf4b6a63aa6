"""Token-level DPO objectives written as a user would, against dpokit's loss interface (docs/losses.md).

A loss is a ``torch.nn.Module`` whose ``forward(policy, reference)`` takes two `ChosenRejectedOutputs` and
returns per-pair ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``. Class attributes ask dpokit for
more than sequence sums: ``needs_per_token_reference`` (the cache must be built with ``--per-token``, or use
``--ref live``) and ``token_stats`` (full-vocabulary values per token, computed in the chunked projection).

    dpokit ref-logps prepared --model MODEL --out ref.h5 --per-token
    PYTHONPATH=examples dpokit train --config demo_lora --data prepared --model MODEL --ref-cache ref.h5 \\
        --loss custom_losses:LengthDesensitizedDPO loss.alpha=0.5

dpokit ships both as ``--loss ld_dpo`` and ``--loss wpo``; these copies show how to write such a loss yourself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask.to(values.dtype)).sum(-1)


class LengthDesensitizedDPO(nn.Module):
    """LD-DPO (Liu et al., 2024): tokens past the shorter completion of a pair count ``alpha`` times."""

    needs_per_token_reference = True  # the reference's per-token log-probs, not only their sums

    def __init__(self, beta: float = 0.1, alpha: float = 0.5):
        super().__init__()
        self.beta, self.alpha = beta, alpha

    def desensitised(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        """Each side's log-prob with the tail past ``min(|y_w|, |y_l|)`` tokens weighted by alpha."""
        shared = torch.minimum(outputs.chosen_token_mask.sum(-1), outputs.rejected_token_mask.sum(-1))
        result = []
        for logps, mask in (
            (outputs.chosen_token_logps, outputs.chosen_token_mask),
            (outputs.rejected_token_logps, outputs.rejected_token_mask),
        ):
            position = torch.arange(logps.shape[1], device=logps.device).expand_as(logps)
            head = position < shared.unsqueeze(1)
            result.append(masked_sum(logps, mask & head) + self.alpha * masked_sum(logps, mask & ~head))
        return result[0], result[1]

    def forward(self, policy, reference):
        policy_chosen, policy_rejected = self.desensitised(policy)
        reference_chosen, reference_rejected = self.desensitised(reference)
        chosen = policy_chosen - reference_chosen
        rejected = policy_rejected - reference_rejected
        losses = -F.logsigmoid(self.beta * (chosen - rejected))
        return losses, self.beta * chosen.detach(), self.beta * rejected.detach()


class WeightedDPO(nn.Module):
    """DPO with WPO's weights (Zhou et al., 2024): pairs the policy itself finds likely count more."""

    token_stats = ("log_sq_norm",)  # log sum_v p(v)^2 per token, computed inside dpokit's chunked projection

    def __init__(self, beta: float = 0.1):
        super().__init__()
        self.beta = beta

    def forward(self, policy, reference):
        chosen_norm, rejected_norm = policy.token_stats["log_sq_norm"]
        weight_chosen = (
            masked_sum(policy.chosen_token_logps - chosen_norm, policy.chosen_token_mask) / policy.chosen_tokens
        )
        weight_rejected = (
            masked_sum(policy.rejected_token_logps - rejected_norm, policy.rejected_token_mask) / policy.rejected_tokens
        )
        weights = torch.clamp(torch.exp(weight_chosen + weight_rejected), max=1).detach()
        chosen = policy.chosen_logps - reference.chosen_logps
        rejected = policy.rejected_logps - reference.rejected_logps
        losses = -F.logsigmoid(self.beta * (chosen - rejected)) * weights
        return losses, self.beta * chosen.detach(), self.beta * rejected.detach()
