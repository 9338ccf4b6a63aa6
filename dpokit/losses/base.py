"""What every built-in loss shares: the base classes (SFT term, WPO weighting, ``beta``), parameter checks,
log-ratios.

A loss declares only its own constructor parameters, keyword-only, and passes ``**common`` on to its base:
`PreferenceLoss` takes ``sft_weight`` and ``wpo``, `BetaLoss` adds ``beta``. `dpokit.losses.loss_parameter_types`
follows that chain to list every parameter a loss accepts.
"""

from __future__ import annotations

import abc
from typing import Any, Optional

import torch
from torch import Tensor, nn

from dpokit.errors import DpokitError
from dpokit.ranges import ABOVE_0, AT_LEAST_0, Range
from dpokit.types import ChosenRejectedOutputs

BETA_WHY = "0 learns nothing, and a negative beta prefers the rejected responses"


class PreferenceLoss(nn.Module, abc.ABC):
    """Base of the built-in losses: subclasses define `pair_losses`; this adds WPO weighting and an SFT term.

    Class attributes a loss may set (the recipe reads them; a user's loss may set them too):
        is_reference_free: needs no reference model or cache.
        needs_per_token_reference: reads the reference's per-token log-probs (``ref-logps --per-token``).
        token_stats: full-vocabulary values per token the policy forward must compute (`dpokit.logps.TOKEN_STATS`).
    """

    is_reference_free = False
    needs_per_token_reference = False
    token_stats: tuple[str, ...] = ()

    def __init__(self, *, sft_weight: float = 0.0, wpo: bool = False):
        super().__init__()
        self.sft_weight = check_parameter("sft_weight", sft_weight, AT_LEAST_0)
        self.wpo = check_flag("wpo", wpo)
        if self.wpo:
            self.token_stats = ("log_sq_norm",)

    @abc.abstractmethod
    def pair_losses(
        self, policy: ChosenRejectedOutputs, reference: Optional[ChosenRejectedOutputs]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-pair (losses, chosen_rewards, rejected_rewards) before WPO weighting and the SFT term."""

    def forward(
        self, policy: ChosenRejectedOutputs, reference: Optional[ChosenRejectedOutputs]
    ) -> tuple[Tensor, Tensor, Tensor]:
        losses, chosen_rewards, rejected_rewards = self.pair_losses(policy, reference)
        if self.wpo:
            losses = losses * wpo_weights(policy)
        if self.sft_weight:
            chosen_avg, _ = policy.average_logps()
            losses = losses + self.sft_weight * (-chosen_avg)
        return losses, chosen_rewards, rejected_rewards


class BetaLoss(PreferenceLoss):
    """Base of the losses scaled by ``beta`` (> 0); `beta_why` is what a bad value would do, for the error."""

    beta_why = BETA_WHY

    def __init__(self, *, beta: float = 0.1, **common: Any):
        super().__init__(**common)
        self.beta = check_parameter("beta", beta, ABOVE_0, why=self.beta_why)


def wpo_weights(policy: ChosenRejectedOutputs) -> Tensor:
    """WPO (Zhou et al., 2024) pair weights, as TRL's ``use_weighting``: per sequence the mean over tokens of
    ``log p(y_t) - log sum_v p(v)^2``; the pair weight is ``min(1, exp(w_chosen + w_rejected))``, detached."""
    if "log_sq_norm" not in policy.token_stats or not policy.has_token_logps:
        raise DpokitError("WPO weighting needs the policy's per-token log-probs and token_stats['log_sq_norm']")
    chosen_norm, rejected_norm = policy.token_stats["log_sq_norm"]
    weights = []
    for logps, norm, mask in (
        (policy.chosen_token_logps, chosen_norm, policy.chosen_token_mask),
        (policy.rejected_token_logps, rejected_norm, policy.rejected_token_mask),
    ):
        mask = mask.to(logps.dtype)
        weights.append(((logps - norm) * mask).sum(-1) / mask.sum(-1).clamp(min=1))
    return torch.clamp(torch.exp(weights[0] + weights[1]), max=1).detach()


def check_parameter(name: str, value: Any, allowed: Range, why: str = "") -> float:
    """`value` as a float if it is a number in `allowed`; else an error naming ``loss.<name>`` and `why` it matters."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DpokitError(f"loss.{name} must be a number, got {value!r}")
    if value not in allowed:
        reason = f" ({why})" if why else ""
        raise DpokitError(f"loss.{name}={value!r} is out of range; it must be {allowed}{reason}")
    return float(value)


def check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise DpokitError(f"loss.{name} must be true or false, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise DpokitError(f"loss.{name}={value!r} is not valid; choose one of: {', '.join(choices)}")
    return value


def logratios(policy: ChosenRejectedOutputs, reference: ChosenRejectedOutputs) -> tuple[Tensor, Tensor]:
    """``(log pi(y_w)/ref(y_w), log pi(y_l)/ref(y_l))`` per pair, from sequence sums."""
    return policy.chosen_logps - reference.chosen_logps, policy.rejected_logps - reference.rejected_logps


def rewards(scale: float, chosen: Tensor, rejected: Tensor) -> tuple[Tensor, Tensor]:
    """``scale * value``, detached: the implicit rewards logged as rewards/chosen and rewards/rejected."""
    return (scale * chosen).detach(), (scale * rejected).detach()


def check_loss_outputs(loss: nn.Module, outputs: Any, num_pairs: int) -> tuple[Tensor, Tensor, Tensor]:
    """What a loss returned, checked: three float tensors of shape ``[B]`` (losses, chosen and rejected
    rewards). A scalar would be averaged a second time and its accuracy read as nonsense."""
    name = type(loss).__name__
    if not (isinstance(outputs, (tuple, list)) and len(outputs) == 3):
        raise DpokitError(
            f"loss {name} returned {type(outputs).__name__}; a loss's forward must return (losses, chosen_rewards, "
            f"rejected_rewards), each a tensor of shape [{num_pairs}] (one value per pair)"
        )
    shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in outputs]
    if any(shape != (num_pairs,) for shape in shapes):
        raise DpokitError(
            f"loss {name} returned shapes {', '.join(map(str, shapes))} for (losses, chosen_rewards, rejected_rewards); "
            f"each must be [{num_pairs}], one value per pair (return per-pair losses, not their mean: the recipe averages)"
        )
    return outputs[0], outputs[1], outputs[2]
