"""Objectives over unpaired data: a prompt and one completion labelled desirable or undesirable (thumbs up or
down), as `UnpairedOutputs` (`dpokit.types`). ``forward(policy, reference) -> (losses [N], rewards [N])``.

Each example is prepared as a group of two completions behind its prompt: its own, and a mismatched one (another
example's, fixed by `prepare`) whose log-ratio estimates the KL term. The reference cache holds both, so a run
stays exact and resumable. An unpaired loss receives the batch's groups as `RankedOutputs` and turns them into
`UnpairedOutputs` (`UnpairedLoss.forward`); a user's own subclasses `UnpairedLoss` and writes `unpaired_losses`.

Notation, per example: ``r = log pi(y|x) - log ref(y|x)`` (sums over completion tokens), ``r_KL`` the same of its
mismatched completion; at step 1 the policy is the reference, so ``r = r_KL = 0``. docs/losses.md, "Unpaired
data", has the formulas.
"""

from __future__ import annotations

import abc
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dpokit.errors import DpokitError
from dpokit.losses.base import BETA_WHY, check_parameter
from dpokit.ranges import ABOVE_0, AT_LEAST_0
from dpokit.types import RankedOutputs, UnpairedOutputs, unpaired_outputs


def global_mean(values: Tensor) -> Tensor:
    """The mean of `values` over every process's batch (one all-reduce of the sum and the count; this process's
    mean outside a process group): each process runs the same number of loss calls, so the collectives match."""
    stats = torch.stack([values.detach().double().sum(), values.new_tensor(values.numel(), dtype=torch.float64)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    return (stats[0] / stats[1].clamp(min=1)).to(values.dtype)


class UnpairedLoss(nn.Module, abc.ABC):
    """Base of the unpaired losses: ``beta`` (> 0) and the weights of desirable and undesirable examples (TRL's
    ``desirable_weight``/``undesirable_weight``: with unbalanced labels, the KTO paper keeps ``desirable_weight *
    n_desirable / (undesirable_weight * n_undesirable)`` between 1 and 4/3). ``kl`` holds the last call's KL
    estimate (a detached scalar; None for a loss without one), logged as ``kl``."""

    is_unpaired = True

    def __init__(self, *, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        super().__init__()
        self.beta = check_parameter("beta", beta, ABOVE_0, why=BETA_WHY)
        self.desirable_weight = check_parameter("desirable_weight", desirable_weight, AT_LEAST_0)
        self.undesirable_weight = check_parameter("undesirable_weight", undesirable_weight, AT_LEAST_0)
        self.kl: Optional[Tensor] = None
        self.term_values: dict[str, Tensor] = {}

    def forward(self, policy: RankedOutputs, reference: Optional[RankedOutputs]) -> tuple[Tensor, Tensor]:
        if reference is None:
            raise DpokitError(f"loss {type(self).__name__} compares the policy with the reference: give --ref-cache")
        losses, rewards = self.unpaired_losses(unpaired_outputs(policy), unpaired_outputs(reference))
        self.term_values = {} if self.kl is None else {"kl": self.kl.expand(losses.shape[0])}  # logged as ``kl``
        return losses, rewards

    def weighted(self, desirable: Tensor, desirable_losses: Tensor, undesirable_losses: Tensor) -> Tensor:
        """Each example's loss: its label's term times its label's weight."""
        return torch.where(
            desirable, self.desirable_weight * desirable_losses, self.undesirable_weight * undesirable_losses
        )

    @abc.abstractmethod
    def unpaired_losses(self, policy: UnpairedOutputs, reference: UnpairedOutputs) -> tuple[Tensor, Tensor]:
        """``(losses [N], rewards [N])``: each example's weighted loss and its reward ``beta * r`` (detached)."""


class KTOLoss(UnpairedLoss):
    """Kahneman-Tversky optimisation (Ethayarajh et al., 2024, eq. 7): with ``z = max(0, mean r_KL)`` over the
    global micro-batch (detached, every process's mismatched completions), a desirable example's loss is
    ``desirable_weight * (1 - sigma(beta (r - z)))`` and an undesirable one's ``undesirable_weight * (1 - sigma(beta
    (z - r)))``; 0.5 (times the weight) at step 1. TRL: ``KTOTrainer`` with ``loss_type="kto"``."""

    def unpaired_losses(self, policy: UnpairedOutputs, reference: UnpairedOutputs) -> tuple[Tensor, Tensor]:
        ratio = policy.logps - reference.logps.to(policy.logps)
        self.kl = global_mean(policy.kl_logps - reference.kl_logps.to(policy.kl_logps)).clamp(min=0).detach()
        desirable = 1 - torch.sigmoid(self.beta * (ratio - self.kl))
        undesirable = 1 - torch.sigmoid(self.beta * (self.kl - ratio))
        return self.weighted(policy.desirable, desirable, undesirable), self.beta * ratio.detach()


class APOZeroUnpairedLoss(UnpairedLoss):
    """Anchored preference optimisation, zero anchor, unpaired (D'Oosterlinck et al., 2024): ``1 - sigma(beta r)``
    for a desirable example, ``sigma(beta r)`` for an undesirable one (no KL term); 0.5 at step 1.
    TRL: ``KTOTrainer`` with ``loss_type="apo_zero_unpaired"``."""

    def unpaired_losses(self, policy: UnpairedOutputs, reference: UnpairedOutputs) -> tuple[Tensor, Tensor]:
        ratio = policy.logps - reference.logps.to(policy.logps)
        desirable = 1 - torch.sigmoid(self.beta * ratio)
        undesirable = torch.sigmoid(self.beta * ratio)
        return self.weighted(policy.desirable, desirable, undesirable), self.beta * ratio.detach()


class BCOUnpairedLoss(UnpairedLoss):
    """Binary classifier optimisation (Jung et al., 2024), unpaired: ``-log sigma(beta r - delta)`` for a desirable
    example, ``-log sigma(-(beta r - delta))`` for an undesirable one, ``delta`` the running mean of every reward
    seen in training (over every process; saved in checkpoints, as pairwise ``bco``'s); ln 2 at step 1.
    TRL: ``BCOTrainer`` without its embedding-based distribution matching."""

    def __init__(self, **common: Any):
        super().__init__(**common)
        self.register_buffer("reward_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("reward_count", torch.zeros((), dtype=torch.float64))

    def delta(self, rewards: Tensor) -> Tensor:
        """Fold this batch's rewards (every process's, in training) into the running mean; return the mean."""
        batch = torch.stack(
            [rewards.detach().double().sum(), torch.tensor(float(rewards.numel()), dtype=torch.float64)]
        ).to(rewards.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch)
        total, count = self.reward_sum + batch[0].to(self.reward_sum), self.reward_count + batch[1].to(self.reward_sum)
        if self.training:
            self.reward_sum.copy_(total)
            self.reward_count.copy_(count)
        return (total / count.clamp(min=1)).to(rewards)

    def unpaired_losses(self, policy: UnpairedOutputs, reference: UnpairedOutputs) -> tuple[Tensor, Tensor]:
        rewards = self.beta * (policy.logps - reference.logps.to(policy.logps))
        delta = self.delta(rewards)
        desirable = -F.logsigmoid(rewards - delta)
        undesirable = -F.logsigmoid(-(rewards - delta))
        return self.weighted(policy.desirable, desirable, undesirable), rewards.detach()
