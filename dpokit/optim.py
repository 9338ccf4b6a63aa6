"""Optimizer and learning-rate schedule from the config."""

from __future__ import annotations

import math

import torch
from torch import nn

from dpokit.errors import DpokitError


def build_optimizer(model: nn.Module, cfg) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA) or bitsandbytes' 8-bit AdamW over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DpokitError("the model has no trainable parameters; check model.method and lora.target_modules")
    kwargs = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise DpokitError(f"optimizer.name=adamw8bit needs bitsandbytes ({exc}); use optimizer.name=adamw") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    fused = all(p.is_cuda for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


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
