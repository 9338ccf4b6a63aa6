"""What dpokit must know about a model family to reproduce its forward: attention pattern and logits.

dpokit does not call the model's own forward (it would materialise ``[2B, T, V]`` logits and could
not take the packed and prefix-shared layouts' masks as the model means them). It runs the decoder
and the output projection itself, so two things a family does must be reproduced here:

- **The attention pattern.** Per layer: full causal attention, or a sliding window of ``W`` tokens
  (query at position ``q`` sees keys at ``q - W < k <= q``). Read from ``config.layer_types`` when the
  model has it (Gemma 2/3, Qwen2/3 and most recent families: ``full_attention`` or
  ``sliding_attention``), else from ``config.sliding_window`` (Mistral, Mixtral, Phi-3: every layer
  slides when it is set). Anything else (chunked or linear attention) makes the packed layouts
  unsupported; the padded layout still works, since the model then builds its own masks.
- **What happens after the output projection** (`logits_transform`): final logit soft-capping
  (Gemma 2/3), dividing by ``logits_scaling`` (Granite), multiplying by ``logit_scale`` (Cohere).

`dpokit.fidelity` checks both against the model's own ``model(ids).logits`` when a run starts, so a
family that does something this module does not know is refused instead of trained on wrong numbers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

FULL, SLIDING = "full_attention", "sliding_attention"

# Attention implementations dpokit accepts; "auto" lets transformers choose for the family (SDPA
# where the family supports it, eager where it does not, e.g. Gemma 2's soft-capped attention).
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flex_attention")


class UnsupportedPattern(Exception):
    """The model's attention cannot be expressed by dpokit's 4-D masks (use the padded layout)."""


@dataclass(frozen=True)
class AttentionPattern:
    """Per-layer attention of a decoder: ``windows[i]`` is None (full causal) or a window in tokens."""

    windows: tuple[Optional[int], ...]
    per_layer_masks: bool  # the model takes a {layer type: mask} dict (layers differ)

    @property
    def kinds(self) -> set[Optional[int]]:
        return set(self.windows)


def attention_pattern(config) -> AttentionPattern:
    """The attention each decoder layer uses, from the model config (see the module docstring)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        windows = []
        for kind in layer_types:
            if kind == FULL:
                windows.append(None)
            elif kind == SLIDING and window:
                windows.append(int(window))
            elif kind == SLIDING:  # no window configured: the layer is full attention
                windows.append(None)
            else:
                raise UnsupportedPattern(f"layer type {kind!r}")
        return AttentionPattern(tuple(windows), per_layer_masks=len(set(windows)) > 1)
    layers = int(getattr(config, "num_hidden_layers", 1))
    return AttentionPattern((int(window) if window else None,) * layers, per_layer_masks=False)


def decoder_masks(
    structure: Tensor,
    position_ids: Optional[Tensor],
    config,
    attn_implementation: str,
    mask_dtype: torch.dtype = torch.float32,
):
    """The mask(s) to pass the decoder for a layout's ``[R, 1, L, L]`` structural mask.

    `structure` says which keys each query may see (same sequence, causal, shared prompt or own
    branch). Sliding layers further keep only keys whose *position* is within the window (positions,
    not columns: in the prefix-shared layout a rejected token's position continues from the prompt's
    end while its column follows the chosen tokens). Returns one mask when every layer is alike, or
    ``{"full_attention": ..., "sliding_attention": ...}`` for models that mix them. Eager attention
    adds its mask to the scores, so it gets the additive float form.
    """
    pattern = attention_pattern(config)
    masks = {}
    for window in pattern.kinds:
        mask = structure
        if window is not None:
            positions = (
                position_ids
                if position_ids is not None
                else torch.arange(structure.shape[-1], device=structure.device)[None]
            )
            distance = positions[:, :, None] - positions[:, None, :]  # [R, L(query), L(key)]
            mask = structure & (distance < window).unsqueeze(1)  # a token always sees itself: no empty rows
        masks[window] = mask if attn_implementation != "eager" else additive_mask(mask, mask_dtype)
    if not pattern.per_layer_masks:
        return next(iter(masks.values()))
    window = next(w for w in pattern.windows if w is not None)
    return {FULL: masks.get(None, masks[window]), SLIDING: masks[window]}


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True: may attend) as eager attention adds it to the scores: 0 or the dtype's min."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


# Scalings transformers' causal LMs apply to the output projection's logits in `forward`, by config attribute,
# in the order they are applied: (attribute, multiply or divide). A family where the same attribute means the
# other operation is listed in `SCALING_BY_FAMILY`. Read from transformers' modeling files; a scaling not
# listed here is caught by the start-up check (the family is refused, never silently wrong).
LOGIT_SCALINGS = (
    ("logits_scaling", "divide"),  # Granite, Granite MoE (shared, hybrid, SWA): logits / logits_scaling
    ("logit_scale", "multiply"),  # Cohere, Cohere 2 (MoE): logits * logit_scale
    ("lm_head_multiplier", "multiply"),  # Falcon-H1: lm_head(h) * lm_head_multiplier
    ("output_multiplier", "multiply"),  # Muse Spark / Glimmer text models
)
SCALING_BY_FAMILY = {"hyperclovax": {"logits_scaling": "multiply"}}  # HyperCLOVA X: lm_head(h) * logits_scaling


def logits_transform(config) -> Optional[Callable[[Tensor], Tensor]]:
    """What the family's forward does to the output projection's logits, as a function (None: nothing)."""
    steps: list[Callable[[Tensor], Tensor]] = []
    family = SCALING_BY_FAMILY.get(getattr(config, "model_type", ""), {})
    for attribute, default in LOGIT_SCALINGS:
        value = getattr(config, attribute, None)
        if value in (None, 1, 1.0):
            continue
        if family.get(attribute, default) == "divide":
            steps.append(lambda logits, v=float(value): logits / v)
        else:
            steps.append(lambda logits, v=float(value): logits * v)
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3/3n: cap * tanh(logits / cap)
    if cap:
        steps.append(lambda logits, c=float(cap): torch.tanh(logits / c) * c)
    if not steps:
        return None

    def transform(logits: Tensor) -> Tensor:
        for step in steps:
            logits = step(logits)
        return logits

    return transform


def resolve_attn_implementation(model_path: str, requested: str) -> str:
    """``sdpa`` or ``eager`` for a model directory: `requested`, or for ``auto`` what transformers
    would choose for the family (SDPA where the model class supports it, eager where it does not)."""
    if requested not in ATTN_IMPLEMENTATIONS:
        from dpokit.errors import DpokitError

        raise DpokitError(f"attention implementation {requested!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    if requested != "auto":
        return requested
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(model_path)
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except (OSError, KeyError, ValueError):
        return "sdpa"  # loading will raise the clear error
    return "sdpa" if getattr(model_class, "_supports_sdpa", False) else "eager"


WRAPPER_PREFIX = "dpokit:"  # `dpokit.attention` routes an implementation through its layout attention


def attn_implementation_of(model) -> str:
    """The attention implementation a loaded model actually uses (``sdpa``, ``eager``, ...); dpokit's
    wrapper (`dpokit.attention`) computes the same thing and is not a different implementation."""
    name = str(getattr(model.config, "_attn_implementation", None) or "eager")
    return name.removeprefix(WRAPPER_PREFIX)


@contextlib.contextmanager
def shrunk_windows(config, window: int) -> Iterator[bool]:
    """Set ``config.sliding_window`` (and a nested text config's) to at most `window`, restored after.

    The start-up check uses it so that short real examples exercise sliding-window masks that would
    otherwise only differ from full attention on sequences longer than the model's real window.
    Yields whether the model has a window at all.
    """
    configs = [c for c in (config, getattr(config, "text_config", None)) if getattr(c, "sliding_window", None)]
    saved = [c.sliding_window for c in configs]
    try:
        for c in configs:
            c.sliding_window = min(int(c.sliding_window), window)
        yield bool(configs)
    finally:
        for c, value in zip(configs, saved):
            c.sliding_window = value
