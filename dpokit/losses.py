"""Preference losses over `ChosenRejectedOutputs`, in torchtune's signature.

Every loss is ``forward(policy, reference) -> (losses, chosen_rewards, rejected_rewards)``, each a
``[B]`` tensor. With ``logits = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)``:

=========  =================================================================  ===================
name       per-pair loss                                                      rewards
=========  =================================================================  ===================
dpo        -(1-ls)*logsigmoid(beta*logits) - ls*logsigmoid(-beta*logits)       beta*(pi - ref)
rso/hinge  relu(1 - gamma*logits)                                             gamma*(pi - ref)
ipo        (logits_avg - 1/(2*tau))**2, on length-averaged log-probs           tau*(avg_pi - avg_ref)
simpo      -logsigmoid(beta*(avg_pi_chosen - avg_pi_rejected) - gamma)         beta*avg_pi
=========  =================================================================  ===================

Each built-in loss also takes ``sft_weight``: adds ``sft_weight * NLL(chosen)/chosen_tokens`` (RPO).
A user's loss is any ``torch.nn.Module`` with the same ``forward``; ``--loss pkg.module:Class``
loads it and ``loss.<param>=value`` sets its constructor arguments.
"""

from __future__ import annotations

import abc
import importlib
import inspect
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpokit.errors import DpokitError
from dpokit.types import ABOVE_0, AT_LEAST_0, ChosenRejectedOutputs, Range

BETA_WHY = "0 learns nothing, and a negative beta prefers the rejected responses"


class PreferenceLoss(nn.Module, abc.ABC):
    """Base of the built-in losses: subclasses define `pair_losses`; this adds the optional SFT term."""

    is_reference_free = False

    def __init__(self, sft_weight: float = 0.0):
        super().__init__()
        self.sft_weight = check_parameter("sft_weight", sft_weight, AT_LEAST_0)

    @abc.abstractmethod
    def pair_losses(
        self, policy: ChosenRejectedOutputs, reference: Optional[ChosenRejectedOutputs]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-pair (losses, chosen_rewards, rejected_rewards) before the SFT term."""

    def forward(
        self, policy: ChosenRejectedOutputs, reference: Optional[ChosenRejectedOutputs]
    ) -> tuple[Tensor, Tensor, Tensor]:
        losses, chosen_rewards, rejected_rewards = self.pair_losses(policy, reference)
        if self.sft_weight:
            chosen_avg, _ = policy.average_logps()
            losses = losses + self.sft_weight * (-chosen_avg)
        return losses, chosen_rewards, rejected_rewards


def check_parameter(name: str, value: Any, allowed: Range, why: str = "") -> float:
    """`value` as a float if it is a number in `allowed`; else an error naming ``loss.<name>`` and `why` it matters."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DpokitError(f"loss.{name} must be a number, got {value!r}")
    if value not in allowed:
        reason = f" ({why})" if why else ""
        raise DpokitError(f"loss.{name}={value!r} is out of range; it must be {allowed}{reason}")
    return float(value)


def _logratios(policy: ChosenRejectedOutputs, reference: ChosenRejectedOutputs) -> Tensor:
    return (policy.chosen_logps - policy.rejected_logps) - (reference.chosen_logps - reference.rejected_logps)


class DPOLoss(PreferenceLoss):
    """Direct Preference Optimization (Rafailov et al., 2023); `label_smoothing` > 0 is conservative DPO."""

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0, sft_weight: float = 0.0):
        super().__init__(sft_weight)
        self.beta = check_parameter("beta", beta, ABOVE_0, why=BETA_WHY)
        self.label_smoothing = check_parameter("label_smoothing", label_smoothing, Range(0, 0.5))

    def pair_losses(self, policy, reference):
        logits = _logratios(policy, reference)
        losses = (
            -(1 - self.label_smoothing) * F.logsigmoid(self.beta * logits)
            - self.label_smoothing * F.logsigmoid(-self.beta * logits)
        )
        chosen_rewards = self.beta * (policy.chosen_logps - reference.chosen_logps).detach()
        rejected_rewards = self.beta * (policy.rejected_logps - reference.rejected_logps).detach()
        return losses, chosen_rewards, rejected_rewards


class RSOLoss(PreferenceLoss):
    """Statistical rejection sampling optimisation's hinge loss (Liu et al., 2023)."""

    def __init__(self, gamma: float = 0.1, sft_weight: float = 0.0):
        super().__init__(sft_weight)
        self.gamma = check_parameter(
            "gamma", gamma, ABOVE_0, why="it scales the margin: 0 gives a constant loss, a negative gamma prefers the rejected responses"
        )

    def pair_losses(self, policy, reference):
        logits = _logratios(policy, reference)
        losses = torch.relu(1 - self.gamma * logits)
        chosen_rewards = self.gamma * (policy.chosen_logps - reference.chosen_logps).detach()
        rejected_rewards = self.gamma * (policy.rejected_logps - reference.rejected_logps).detach()
        return losses, chosen_rewards, rejected_rewards


class IPOLoss(PreferenceLoss):
    """Identity preference optimisation (Azar et al., 2023) on length-averaged log-probs."""

    def __init__(self, tau: float = 0.1, sft_weight: float = 0.0):
        super().__init__(sft_weight)
        self.tau = check_parameter("tau", tau, ABOVE_0, why="the target margin is 1/(2*tau)")

    def pair_losses(self, policy, reference):
        pi_chosen, pi_rejected = policy.average_logps()
        ref_chosen, ref_rejected = reference.average_logps()
        logits = (pi_chosen - pi_rejected) - (ref_chosen - ref_rejected)
        losses = (logits - 1 / (2 * self.tau)) ** 2
        chosen_rewards = self.tau * (pi_chosen - ref_chosen).detach()
        rejected_rewards = self.tau * (pi_rejected - ref_rejected).detach()
        return losses, chosen_rewards, rejected_rewards


class SimPOLoss(PreferenceLoss):
    """Simple preference optimisation (Meng et al., 2024): reference-free, length-normalised, margin gamma."""

    is_reference_free = True

    def __init__(self, beta: float = 2.0, gamma: float = 0.5, sft_weight: float = 0.0):
        super().__init__(sft_weight)
        self.beta = check_parameter("beta", beta, ABOVE_0, why=BETA_WHY)
        self.gamma = check_parameter("gamma", gamma, AT_LEAST_0, why="it is the target reward margin")

    def pair_losses(self, policy, reference):
        pi_chosen, pi_rejected = policy.average_logps()
        losses = -F.logsigmoid(self.beta * (pi_chosen - pi_rejected) - self.gamma)
        return losses, self.beta * pi_chosen.detach(), self.beta * pi_rejected.detach()


LOSSES: dict[str, type[nn.Module]] = {
    "dpo": DPOLoss,
    "rso": RSOLoss,
    "hinge": RSOLoss,
    "ipo": IPOLoss,
    "simpo": SimPOLoss,
}


def loss_class(name: str) -> type[nn.Module]:
    """A registered loss name, or ``package.module:Class`` for a user's own loss."""
    if name in LOSSES:
        return LOSSES[name]
    if ":" not in name:
        raise DpokitError(
            f"unknown loss {name!r}; choose one of {', '.join(sorted(LOSSES))} or give package.module:Class"
        )
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DpokitError(f"loss {name!r}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise DpokitError(f"loss {name!r}: module {module_name!r} has no attribute {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise DpokitError(f"loss {name!r} must be a torch.nn.Module subclass with forward(policy, reference)")
    return cls


def loss_parameters(cls: type) -> list[str]:
    """Names of the constructor parameters a loss accepts."""
    signature = inspect.signature(cls.__init__)
    return [
        p.name
        for p in list(signature.parameters.values())[1:]
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def build_loss(spec: dict[str, Any]) -> nn.Module:
    """Build a loss from the config's ``loss`` section: ``name`` plus constructor parameters."""
    spec = dict(spec)
    name = spec.pop("name", "dpo")
    cls = loss_class(str(name))
    valid = loss_parameters(cls)
    unknown = [key for key in spec if key not in valid]
    if unknown:
        listed = ", ".join(f"loss.{p}" for p in valid) or "none"
        raise DpokitError(f"loss {name!r} has no parameter {', '.join(unknown)}; its parameters: {listed}")
    try:
        return cls(**spec)
    except TypeError as exc:
        raise DpokitError(f"loss {name!r}: {exc}") from None


def is_reference_free(loss: nn.Module) -> bool:
    return bool(getattr(loss, "is_reference_free", False))
