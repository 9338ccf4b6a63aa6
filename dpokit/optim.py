"""Optimizer and learning-rate schedule from the config."""

from __future__ import annotations

import math

import torch
from torch import nn

from dpokit.errors import DpokitError


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW (fused where the kernel serves the parameters: `fused_adamw`) or bitsandbytes' 8-bit AdamW over the
    trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DpokitError("the model has no trainable parameters; check model.method and lora.target_modules")
    return optimizer_over(params, cfg)


def optimizer_over(params: list[nn.Parameter], cfg) -> torch.optim.Optimizer:
    """The configured optimizer over `params`."""
    kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise DpokitError(f"optimizer.name=adamw8bit needs bitsandbytes ({exc}); use optimizer.name=adamw") from exc
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, fused=fused_adamw(params) or None, **kwargs)


def fused_adamw(params: list[nn.Parameter]) -> bool:
    """Whether AdamW's fused kernel serves `params`: all on CUDA, or all plain (unsharded) CPU tensors. On CPU it
    took an AdamW step over 20.6M parameters from 71 ms (foreach) to 10 ms (bench/optimizer_results.md); FSDP's
    sharded parameters keep the foreach implementation."""
    if all(p.is_cuda for p in params):
        return True
    return all(p.device.type == "cpu" and not hasattr(p, "to_local") for p in params)


def lr_multiplier(step: int, total_steps: int, cfg) -> float:
    """Linear warmup over `warmup_steps`, then constant, linear or cosine decay to `min_lr_ratio`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return 1.0
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    if cfg.name == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, cfg))


class OptimizerInBackward:
    """One optimizer (and schedule) per trainable parameter, stepped by a hook the moment that parameter's gradient
    is complete in backward; the gradient is freed at once, so the model's gradients never exist all together
    (torchtune's ``optimizer_in_bwd``). The same update as one optimizer over all parameters; no clipping (it
    needs every gradient first) and no accumulation (a step per backward).

    It stands in for the optimizer (`step` and `zero_grad` have nothing left to do; `state_dict` holds every
    parameter's state by name) and `schedules` for the scheduler.
    """

    def __init__(self, model: nn.Module, cfg, total_steps: int, scheduler_cfg):
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise DpokitError("the model has no trainable parameters; check model.method and lora.target_modules")
        self.optimizers = {name: optimizer_over([p], cfg) for name, p in named}
        self.schedules = Schedules(
            {name: build_scheduler(self.optimizers[name], total_steps, scheduler_cfg) for name, _ in named}
        )
        self.names = {p: name for name, p in named}
        self.hooks = [p.register_post_accumulate_grad_hook(self.update) for _, p in named]

    def update(self, param: nn.Parameter) -> None:
        optimizer = self.optimizers[self.names[param]]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        """Nothing to do: every parameter was updated in backward."""

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do: each gradient was freed right after its update."""

    def state_dict(self) -> dict:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state[name])


class Schedules:
    """Per-parameter learning-rate schedules that advance together, with a scheduler's interface."""

    def __init__(self, schedulers: dict):
        self.schedulers = schedulers

    def step(self) -> None:
        for scheduler in self.schedulers.values():
            scheduler.step()

    def get_last_lr(self) -> list[float]:
        return next(iter(self.schedulers.values())).get_last_lr()

    def state_dict(self) -> dict:
        return {name: scheduler.state_dict() for name, scheduler in self.schedulers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state[name])
