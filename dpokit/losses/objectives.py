"""Every built-in objective, side by side: one small class each, its paper in the docstring.

Notation, per pair: ``r_w = log pi(y_w) - log ref(y_w)`` and ``r_l = log pi(y_l) - log ref(y_l)`` (sums over
completion tokens), ``h = r_w - r_l``; ``avg`` means divided by the completion's token count. At step 1 the
policy is the reference, so ``r_w = r_l = h = 0``; each docstring gives the loss there. docs/losses.md has the
table (formula, parameters, what each needs from the reference, TRL's name).

Each constructor declares only the loss's own parameters (keyword-only); ``**common`` goes to the base:
``beta`` (`BetaLoss`, checked there), ``sft_weight`` and ``wpo`` (`PreferenceLoss`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from dpokit.errors import DpokitError
from dpokit.losses.base import (
    BetaLoss,
    PreferenceLoss,
    check_choice,
    check_parameter,
    logratios,
    rewards,
)
from dpokit.ranges import ABOVE_0, AT_LEAST_0, Range
from dpokit.types import ChosenRejectedOutputs

SMOOTHING = Range(0, 0.5)  # [0, 0.5): 0.5 would make chosen and rejected indistinguishable
DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


def smoothed_logsigmoid_loss(z: Tensor, label_smoothing: float) -> Tensor:
    """``-(1 - eps) log sigma(z) - eps log sigma(-z)``: the conservative (cDPO) form of ``-log sigma(z)``."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def capped_exp(x: Tensor) -> Tensor:
    """``exp(x)`` with the exponent capped where float32 would overflow (TRL's ``cap_exp``)."""
    return torch.exp(torch.clamp(x, max=math.log(torch.finfo(torch.float32).max)))


class DPOLoss(BetaLoss):
    """Direct Preference Optimization (Rafailov et al., 2023): ``-log sigma(beta * h)``; ln 2 at step 1.

    ``label_smoothing`` eps > 0 is conservative DPO (cDPO, Mitchell 2023): ``-(1-eps) log sigma(beta h) -
    eps log sigma(-beta h)``. ``divergence`` picks the f-divergence of f-DPO (Wang et al., 2023), replacing
    ``h`` by ``f'(u_w) - f'(u_l)`` with ``u = pi/ref``: reverse_kl (plain DPO), forward_kl (``-1/u``),
    js_divergence (``log(2u/(1+u))``) or alpha_divergence (``(1 - u^-alpha)/alpha``); all give ln 2 at step 1.
    TRL: ``loss_type="sigmoid"`` with ``label_smoothing`` and ``f_divergence_type``.
    """

    def __init__(
        self, *, label_smoothing: float = 0.0, divergence: str = "reverse_kl", alpha: float = 1.0, **common: Any
    ):
        super().__init__(**common)
        self.label_smoothing = check_parameter("label_smoothing", label_smoothing, SMOOTHING)
        self.divergence = check_choice("divergence", divergence, DIVERGENCES)
        self.alpha = check_parameter("alpha", alpha, ABOVE_0, why="the alpha-divergence's order")

    def margin(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        """``f'(u_w) - f'(u_l)`` from the log-ratios (``h`` for reverse KL)."""
        if self.divergence == "reverse_kl":
            return chosen - rejected
        if self.divergence == "js_divergence":  # log(2u/(1+u)) = log 2 + r - softplus(r)
            return (chosen - rejected) - (F.softplus(chosen) - F.softplus(rejected))
        alpha = 1.0 if self.divergence == "forward_kl" else self.alpha  # forward KL: f'(u) = -1/u
        return (capped_exp(-alpha * rejected) - capped_exp(-alpha * chosen)) / alpha

    def pair_losses(self, policy, reference):
        chosen, rejected = logratios(policy, reference)
        losses = smoothed_logsigmoid_loss(self.beta * self.margin(chosen, rejected), self.label_smoothing)
        return (losses, *rewards(self.beta, chosen, rejected))


class WPOLoss(DPOLoss):
    """DPO weighted by WPO (Zhou et al., 2024): each pair's loss times ``min(1, exp(w_w + w_l))``, ``w`` the
    token mean of ``log p(y_t) - log sum_v p(v)^2`` under the policy (detached); every built-in loss but ``sft``
    takes ``wpo=true`` for the same weighting. TRL: ``use_weighting=True``."""

    def __init__(self, *, wpo: bool = True, **common: Any):
        super().__init__(wpo=wpo, **common)


class RobustDPOLoss(BetaLoss):
    """Robust DPO (Chowdhury et al., 2024), unbiased under label noise eps:
    ``((1-eps)(-log sigma(beta h)) + eps log sigma(-beta h)) / (1 - 2 eps)``; ln 2 at step 1. TRL: ``"robust"``."""

    def __init__(self, *, label_smoothing: float = 0.1, **common: Any):
        super().__init__(**common)
        self.label_smoothing = check_parameter("label_smoothing", label_smoothing, SMOOTHING)

    def pair_losses(self, policy, reference):
        chosen, rejected = logratios(policy, reference)
        z, eps = self.beta * (chosen - rejected), self.label_smoothing
        losses = ((1 - eps) * -F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)
        return (losses, *rewards(self.beta, chosen, rejected))


class NormalizedDPOLoss(DPOLoss):
    """Length-normalised DPO: DPO on length-averaged log-probs, ``h_avg = (avg r_w) - (avg r_l)``
    (as SimPO and IPO normalise); ln 2 at step 1. Rewards are ``beta * avg r``."""

    def pair_losses(self, policy, reference):
        (pi_w, pi_l), (ref_w, ref_l) = policy.average_logps(), reference.average_logps()
        chosen, rejected = pi_w - ref_w, pi_l - ref_l
        losses = smoothed_logsigmoid_loss(self.beta * self.margin(chosen, rejected), self.label_smoothing)
        return (losses, *rewards(self.beta, chosen, rejected))


class LDDPOLoss(BetaLoss):
    """LD-DPO, length-desensitised DPO (Liu et al., 2024): each sequence's log-prob counts its first
    ``min(|y_w|, |y_l|)`` tokens fully and the rest times ``alpha``, for policy and reference alike, then
    DPO; ln 2 at step 1. Needs per-token reference log-probs (``ref-logps --per-token`` or ``--ref live``).
    TRL: ``ld_alpha``."""

    needs_per_token_reference = True

    def __init__(self, *, alpha: float = 0.5, label_smoothing: float = 0.0, **common: Any):
        super().__init__(**common)
        self.alpha = check_parameter(
            "alpha", alpha, Range(0, 1, high_inclusive=True), why="the weight of the longer tail"
        )
        self.label_smoothing = check_parameter("label_smoothing", label_smoothing, SMOOTHING)

    def desensitised(self, outputs: ChosenRejectedOutputs) -> tuple[Tensor, Tensor]:
        if not outputs.has_token_logps:
            raise DpokitError(
                "ld_dpo needs per-token reference log-probs: build the cache with `dpokit ref-logps ... --per-token` "
                "or train with --ref live"
            )
        public = torch.minimum(outputs.chosen_token_mask.sum(-1), outputs.rejected_token_mask.sum(-1))  # [B]
        sides = []
        for logps, mask in (
            (outputs.chosen_token_logps, outputs.chosen_token_mask),
            (outputs.rejected_token_logps, outputs.rejected_token_mask),
        ):
            front = torch.arange(logps.shape[1], device=logps.device) < public.unsqueeze(1)
            weight = torch.where(front, 1.0, self.alpha) * mask.to(logps.dtype)
            sides.append((logps * weight).sum(-1))
        return sides[0], sides[1]

    def pair_losses(self, policy, reference):
        (pi_w, pi_l), (ref_w, ref_l) = self.desensitised(policy), self.desensitised(reference)
        chosen, rejected = pi_w - ref_w, pi_l - ref_l
        losses = smoothed_logsigmoid_loss(self.beta * (chosen - rejected), self.label_smoothing)
        return (losses, *rewards(self.beta, chosen, rejected))


class DPOPLoss(BetaLoss):
    """DPO-Positive (Pal et al., 2024, "Smaug"): ``-log sigma(beta (h - lam * max(0, -r_w)))``, penalising a
    chosen log-prob that falls below the reference's; ln 2 at step 1."""

    def __init__(self, *, lam: float = 50.0, **common: Any):
        super().__init__(**common)
        self.lam = check_parameter("lam", lam, AT_LEAST_0, why="the weight of the chosen log-prob penalty")

    def pair_losses(self, policy, reference):
        chosen, rejected = logratios(policy, reference)
        losses = -F.logsigmoid(self.beta * (chosen - rejected - self.lam * torch.relu(-chosen)))
        return (losses, *rewards(self.beta, chosen, rejected))


class RSOLoss(PreferenceLoss):
    """Statistical rejection sampling optimisation's hinge loss (Liu et al., 2023): ``relu(1 - gamma h)``;
    1 at step 1. TRL: ``"hinge"`` (with beta as gamma)."""

    def __init__(self, *, gamma: float = 0.1, **common: Any):
        super().__init__(**common)
        self.gamma = check_parameter(
            "gamma",
            gamma,
            ABOVE_0,
            why="it scales the margin: 0 gives a constant loss, a negative gamma prefers the rejected responses",
        )

    def pair_losses(self, policy, reference):
        chosen, rejected = logratios(policy, reference)
        return (torch.relu(1 - self.gamma * (chosen - rejected)), *rewards(self.gamma, chosen, rejected))


class IPOLoss(PreferenceLoss):
    """Identity preference optimisation (Azar et al., 2023): ``(h_avg - 1/(2 tau))^2`` on length-averaged
    log-probs (as TRL); ``1/(4 tau^2)`` at step 1. TRL: ``"ipo"`` (tau is TRL's beta)."""

    def __init__(self, *, tau: float = 0.1, **common: Any):
        super().__init__(**common)
        self.tau = check_parameter("tau", tau, ABOVE_0, why="the target margin is 1/(2*tau)")

    def pair_losses(self, policy, reference):
        (pi_w, pi_l), (ref_w, ref_l) = policy.average_logps(), reference.average_logps()
        chosen, rejected = pi_w - ref_w, pi_l - ref_l
        return ((chosen - rejected - 1 / (2 * self.tau)) ** 2, *rewards(self.tau, chosen, rejected))


class EXOLoss(BetaLoss):
    """Efficient exact optimisation (Ji et al., 2024), pairwise: ``sigma(beta h) (log sigma(beta h) - log(1-eps))
    + sigma(-beta h) (log sigma(-beta h) - log eps)``; ``-ln 2 - ln(eps (1-eps))/2`` at step 1.
    TRL: ``"exo_pair"`` (eps defaults to 1e-3 there too)."""

    def __init__(self, *, label_smoothing: float = 1e-3, **common: Any):
        super().__init__(**common)
        self.label_smoothing = check_parameter(
            "label_smoothing", label_smoothing, Range(0, 0.5, low_inclusive=False), why="EXO takes the log of eps"
        )

    def pair_losses(self, policy, reference):
        chosen, rejected = logratios(policy, reference)
        z, eps = self.beta * (chosen - rejected), self.label_smoothing
        losses = torch.sigmoid(z) * (F.logsigmoid(z) - math.log(1 - eps)) + torch.sigmoid(-z) * (
            F.logsigmoid(-z) - math.log(eps)
        )
        return (losses, *rewards(self.beta, chosen, rejected))


class NCALoss(BetaLoss):
    """Noise contrastive alignment (Chen et al., 2024), pairwise: ``-log sigma(beta r_w) - (log sigma(-beta r_w)
    + log sigma(-beta r_l)) / 2``; 2 ln 2 at step 1. TRL: ``"nca_pair"``."""

    def pair_losses(self, policy, reference):
        chosen, rejected = logratios(policy, reference)
        win, lose = self.beta * chosen, self.beta * rejected
        losses = -F.logsigmoid(win) - 0.5 * F.logsigmoid(-win) - 0.5 * F.logsigmoid(-lose)
        return (losses, *rewards(self.beta, chosen, rejected))


class BCOLoss(BetaLoss):
    """Binary classifier optimisation (Jung et al., 2024), pairwise: ``-log sigma(beta r_w - delta) -
    log sigma(-(beta r_l - delta))``, ``delta`` the running mean of all rewards seen so far (over every
    process; saved in checkpoints); 2 ln 2 at step 1. TRL: ``"bco_pair"``."""

    def __init__(self, **common: Any):
        super().__init__(**common)
        self.register_buffer("reward_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("reward_count", torch.zeros((), dtype=torch.float64))

    def update_delta(self, chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
        """Fold this batch's rewards (every rank's, in training) into the running mean; return the mean."""
        batch = torch.stack(
            [
                torch.cat([chosen_rewards, rejected_rewards]).double().sum(),
                torch.tensor(2.0 * chosen_rewards.numel(), dtype=torch.float64, device=chosen_rewards.device),
            ]
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(batch)
        if self.training:
            self.reward_sum += batch[0].to(self.reward_sum.device)
            self.reward_count += batch[1].to(self.reward_count.device)
            total, count = self.reward_sum, self.reward_count
        else:
            total, count = self.reward_sum + batch[0].cpu(), self.reward_count + batch[1].cpu()
        return (total / count.clamp(min=1)).to(chosen_rewards.dtype).to(chosen_rewards.device)

    def pair_losses(self, policy, reference):
        chosen, rejected = logratios(policy, reference)
        chosen_rewards, rejected_rewards = rewards(self.beta, chosen, rejected)
        delta = self.update_delta(chosen_rewards, rejected_rewards)
        losses = -F.logsigmoid(self.beta * chosen - delta) - F.logsigmoid(-(self.beta * rejected - delta))
        return losses, chosen_rewards, rejected_rewards


class SPPOHardLoss(BetaLoss):
    """Self-play preference optimisation (Wu et al., 2024), hard labels: ``(r_w - 1/(2 beta))^2 +
    (r_l + 1/(2 beta))^2``; ``1/(2 beta^2)`` at step 1. TRL: ``"sppo_hard"``."""

    def pair_losses(self, policy, reference):
        chosen, rejected = logratios(policy, reference)
        losses = (chosen - 0.5 / self.beta) ** 2 + (rejected + 0.5 / self.beta) ** 2
        return (losses, *rewards(self.beta, chosen, rejected))


class AOTPairLoss(BetaLoss):
    """Alignment via optimal transport (Melnyk et al., 2024), paired: sort the batch's ``r_w`` and ``r_l``
    separately and apply (c)DPO's loss to ``beta * (sorted r_w - sorted r_l)``: first-order stochastic
    dominance of chosen over rejected; ln 2 at step 1. Per-pair values follow the sorted order.
    TRL: ``"aot_pair"``."""

    def __init__(self, *, label_smoothing: float = 0.0, **common: Any):
        super().__init__(**common)
        self.label_smoothing = check_parameter("label_smoothing", label_smoothing, SMOOTHING)

    def sorted_margin(self, chosen: Tensor, rejected: Tensor, policy, reference) -> Tensor:
        return torch.sort(chosen, dim=0).values - torch.sort(rejected, dim=0).values

    def pair_losses(self, policy, reference):
        chosen, rejected = logratios(policy, reference)
        delta = self.sorted_margin(chosen, rejected, policy, reference)
        return (
            smoothed_logsigmoid_loss(self.beta * delta, self.label_smoothing),
            *rewards(self.beta, chosen, rejected),
        )


class AOTLoss(AOTPairLoss):
    """Alignment via optimal transport, unpaired: sort the policy's ``log pi(y_w) - log pi(y_l)`` and the
    reference's separately and apply (c)DPO's loss to ``beta * (sorted policy - sorted reference)``; ln 2 at
    step 1. TRL: ``"aot"``."""

    def sorted_margin(self, chosen, rejected, policy, reference):
        pi = policy.chosen_logps - policy.rejected_logps
        ref = reference.chosen_logps - reference.rejected_logps
        return torch.sort(pi, dim=0).values - torch.sort(ref, dim=0).values


class APOZeroLoss(BetaLoss):
    """Anchored preference optimisation (D'Oosterlinck et al., 2024), APO-zero: raise chosen, lower rejected:
    ``1 - sigma(beta r_w) + sigma(beta r_l)``; 1 at step 1. TRL: ``"apo_zero"``."""

    def pair_losses(self, policy, reference):
        chosen, rejected = logratios(policy, reference)
        losses = 1 - torch.sigmoid(self.beta * chosen) + torch.sigmoid(self.beta * rejected)
        return (losses, *rewards(self.beta, chosen, rejected))


class APODownLoss(APOZeroLoss):
    """APO-down: lower chosen, and rejected more: ``sigma(beta r_w) + 1 - sigma(beta h)``; 1 at step 1.
    TRL: ``"apo_down"``."""

    def pair_losses(self, policy, reference):
        chosen, rejected = logratios(policy, reference)
        losses = torch.sigmoid(self.beta * chosen) + 1 - torch.sigmoid(self.beta * (chosen - rejected))
        return (losses, *rewards(self.beta, chosen, rejected))


class DiscoPOPLoss(BetaLoss):
    """DiscoPOP (Chris Lu et al., 2024), the discovered log-ratio modulated loss: with ``z = beta h`` and
    ``m = sigma(z / tau)``, ``(1 - m)(-log sigma(z)) + m exp(-z)``; ``(ln 2 + 1)/2`` at step 1.
    TRL: ``"discopop"`` (``discopop_tau``)."""

    def __init__(self, *, tau: float = 0.05, **common: Any):
        super().__init__(**common)
        self.tau = check_parameter("tau", tau, ABOVE_0, why="the modulation's temperature")

    def pair_losses(self, policy, reference):
        chosen, rejected = logratios(policy, reference)
        z = self.beta * (chosen - rejected)
        modulation = torch.sigmoid(z / self.tau)
        losses = (1 - modulation) * -F.logsigmoid(z) + modulation * torch.exp(-z)
        return (losses, *rewards(self.beta, chosen, rejected))


class SimPOLoss(BetaLoss):
    """Simple preference optimisation (Meng et al., 2024), reference-free: ``-log sigma(beta (avg pi_w -
    avg pi_l) - gamma)``, with (c)DPO label smoothing. Rewards ``beta * avg pi``. TRL (CPOTrainer):
    ``loss_type="simpo"`` with ``simpo_gamma``."""

    is_reference_free = True

    def __init__(self, *, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0, **common: Any):
        super().__init__(beta=beta, **common)  # SimPO's own default beta
        self.gamma = check_parameter("gamma", gamma, AT_LEAST_0, why="it is the target reward margin")
        self.label_smoothing = check_parameter("label_smoothing", label_smoothing, SMOOTHING)

    def pair_losses(self, policy, reference):
        pi_w, pi_l = policy.average_logps()
        losses = smoothed_logsigmoid_loss(self.beta * (pi_w - pi_l) - self.gamma, self.label_smoothing)
        return (losses, *rewards(self.beta, pi_w, pi_l))


class ORPOLoss(BetaLoss):
    """Odds-ratio preference optimisation (Hong et al., 2024), reference-free: the chosen NLL (token mean)
    plus ``-beta log sigma(log odds(y_w) - log odds(y_l))``, ``odds = p/(1-p)`` on length-averaged
    log-probs ``p``. Rewards ``beta * avg pi``. TRL: ORPOTrainer (its ``beta`` is the paper's lambda)."""

    is_reference_free = True
    beta_why = "the weight of the odds-ratio term"

    def pair_losses(self, policy, reference):
        pi_w, pi_l = policy.average_logps()
        log_odds = (pi_w - pi_l) - (torch.log1p(-torch.exp(pi_w)) - torch.log1p(-torch.exp(pi_l)))
        losses = -pi_w - self.beta * F.logsigmoid(log_odds)
        return (losses, *rewards(self.beta, pi_w, pi_l))


class SFTLoss(PreferenceLoss):
    """Supervised fine-tuning on the chosen completions, reference-free: the negative log-likelihood.

    ``normalize="token"`` (TRL's ``"sft"`` loss_type): the mean over every chosen token of the batch, as
    per-pair values ``-log pi(y_w) * B / sum of chosen tokens`` (their mean is the token mean).
    ``normalize="pair"``: each pair's own token mean ``-avg pi(y_w)`` (what ``sft_weight`` adds).
    Rewards are ``avg pi`` (no reference).
    """

    is_reference_free = True

    def __init__(self, *, normalize: str = "token"):  # no sft_weight or wpo: it is the SFT term, unweighted
        super().__init__()
        self.normalize = check_choice("normalize", normalize, ("token", "pair"))

    def pair_losses(self, policy, reference):
        pi_w, pi_l = policy.average_logps()
        if self.normalize == "pair":
            losses = -pi_w
        else:
            tokens = policy.chosen_tokens.sum().clamp(min=1).to(policy.chosen_logps.dtype)
            losses = -policy.chosen_logps * policy.chosen_logps.numel() / tokens
        return (losses, *rewards(1.0, pi_w, pi_l))
