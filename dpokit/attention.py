"""The packed and prefix-shared layouts' attention, computed from O(L) metadata instead of an L×L mask.

A packed row holds segments laid end to end (`dpokit.types.Segment`): a plain sequence, a pair
``[prompt, chosen, rejected]`` whose rejected tokens see the prompt but not chosen, or a ranked group
``[prompt, completion_1, ..., completion_k]`` whose completions each see the prompt and themselves only; every
branch's positions continue from the prompt's end. Each segment's attention is k ordinary causal problems:

- **the first branch** (chosen, or the whole plain sequence): queries and keys ``[prompt; branch]``, causal;
- **every other branch** (rejected): queries ``branch``, keys ``[prompt; branch]``, causal aligned at the
  bottom right (the branch's first query sees the whole prompt and itself).

Each problem goes to a kernel that never builds a mask of its size:

- causal, no window: SDPA with ``is_causal=True`` (the blockwise flash kernel on CPU and CUDA);
- bottom-right causal: on CPU, `MergedCausalAttention` runs the prompt keys (no mask) and the rejected
  keys (``is_causal``) through the CPU flash kernel and merges them by their log-sum-exps; backward
  calls the flash backward on each part with the merged output and log-sum-exp, as ring attention does,
  so it is exact and keeps no ``[Lq, Lk]`` tensor. On CUDA, SDPA with ``causal_lower_right`` (the
  flash and memory-efficient kernels align causal masks bottom-right natively);
- sliding windows (by position): query blocks of `WINDOW_BLOCK` queries against the keys their window
  can reach, each with a small banded mask: O(L·window) memory;
- eager families (soft-capped attention scores, Gemma 2): the family's own eager function on each
  problem with that problem's mask. Eager attention materialises its scores anyway; memory is the
  longest pair's squared length, not the row's.
- ``flex_attention`` (`model.attn_implementation=flex_attention`): one FlexAttention call per row with a
  block mask built from the same metadata (segment, causal, prompt-or-own-branch, window by position)
  and the family's soft-capping as a score modifier; compiled on CUDA. Its backward does not run on
  CPU in torch 2.13, so CPU training uses the kernels above.

Grouped-query attention stays grouped (``enable_gqa``; the CPU flash kernel takes fewer k/v heads).

`install(decoder)` points a decoder's config at ``dpokit:<its implementation>``, registered with
transformers' attention and mask interfaces. Without a layout the function is the model's own
(`sdpa_attention_forward` or the family's ``eager_attention_forward``, with the model's own masks), so
``model(ids)`` is unchanged; a layout forward passes ``dpokit_layout=`` through the decoder's kwargs
(kept by activation checkpointing for recomputation), and the mask functions return None while it runs.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sys
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.family import WRAPPER_PREFIX as PREFIX
from dpokit.family import UnsupportedPattern, attention_pattern, attn_implementation_of
from dpokit.types import Segment

WINDOW_BLOCK = 512  # queries per block of a sliding-window problem (at least the window)
# Rows up to this many columns keep the dense mask: there one masked kernel call per layer costs less than a
# few kernel calls per pair, and the mask is small (bench/long_context_results.md, "short rows").
DENSE_MAX_WIDTH = 384
MERGED_DTYPES = (torch.float32, torch.float64, torch.bfloat16)  # what the CPU flash kernel takes
INNER = ("sdpa", "eager", "flex_attention")  # implementations dpokit wraps

_LAYOUT_FORWARD: contextvars.ContextVar[bool] = contextvars.ContextVar("dpokit_layout_forward", default=False)


@dataclass(frozen=True)
class LayoutAttention:
    """What the attention function needs of a packed batch: its segments and each layer's window."""

    segments: tuple[Segment, ...]
    width: int  # columns per row
    rows: int
    windows: tuple[Optional[int], ...]  # per layer: None (full causal) or a window in positions
    block_masks: dict = field(default_factory=dict, compare=False, repr=False)  # FlexAttention's, per window

    def window(self, module) -> Optional[int]:
        if len(set(self.windows)) == 1:
            return self.windows[0]
        return self.windows[int(module.layer_idx)]

    @functools.cached_property
    def by_row(self) -> tuple[tuple[Segment, ...], ...]:
        """Each row's segments in column order; grouped once per forward, read by every layer."""
        rows: list[list[Segment]] = [[] for _ in range(self.rows)]
        for segment in self.segments:
            rows[segment.row].append(segment)
        return tuple(tuple(sorted(row, key=lambda s: s.start)) for row in rows)


def segment_columns(segments: Sequence[Segment], rows: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per column ``[R, L]``: segment number (-1 on padding), branch (0 shared, 1.. the branches), position:
    the per-token form of the segments, for FlexAttention's block mask and for the dense mask they mean."""
    segment_ids = torch.full((rows, width), -1, dtype=torch.long)
    branches = torch.zeros((rows, width), dtype=torch.long)
    positions = torch.zeros((rows, width), dtype=torch.long)
    for number, seg in enumerate(segments):
        s, p = seg.start, seg.shared
        segment_ids[seg.row, s : s + seg.length] = number
        positions[seg.row, s : s + p] = torch.arange(p)
        for branch, (first, size) in enumerate(zip(seg.branch_starts(), seg.branches), start=1):
            branches[seg.row, first : first + size] = branch
            positions[seg.row, first : first + size] = torch.arange(p, p + size)
    return segment_ids, branches, positions


def layout_for(segments: Sequence[Segment], input_ids: Tensor, config) -> LayoutAttention:
    """The `LayoutAttention` of a batch for a model config (per-layer windows from `dpokit.family`)."""
    rows, width = input_ids.shape
    return LayoutAttention(tuple(segments), int(width), int(rows), attention_pattern(config).windows)


# ---------------------------------------------------------------------------------------------
# Kernels for one causal problem: queries are the last Lq of a sequence of Lk keys


class MergedCausalAttention(torch.autograd.Function):
    """Queries ``[1, H, Lq, D]`` over keys ``[prefix; own]`` where every query sees the whole prefix and
    the own keys causally (``own`` has Lq keys): two CPU flash calls merged by log-sum-exp."""

    @staticmethod
    def forward(ctx, query, prefix_key, prefix_value, own_key, own_value, scale):
        flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
        out_prefix, lse_prefix = flash(query, prefix_key, prefix_value, 0.0, False, scale=scale)[:2]
        out_own, lse_own = flash(query, own_key, own_value, 0.0, True, scale=scale)[:2]
        lse = torch.logaddexp(lse_prefix, lse_own)  # [1, H, Lq], at least float32
        wide = torch.promote_types(query.dtype, torch.float32)  # bf16 outputs merge in float32
        out = (
            out_prefix.to(wide) * (lse_prefix - lse).exp_().unsqueeze(-1)
            + out_own.to(wide) * (lse_own - lse).exp_().unsqueeze(-1)
        ).to(query.dtype)
        ctx.scale = scale
        ctx.save_for_backward(query, prefix_key, prefix_value, own_key, own_value, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, prefix_key, prefix_value, own_key, own_value, out, lse = ctx.saved_tensors
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        grad_out = grad_out.contiguous()
        dq_prefix, dk_prefix, dv_prefix = backward(
            grad_out, query, prefix_key, prefix_value, out, lse, 0.0, False, scale=ctx.scale
        )
        dq_own, dk_own, dv_own = backward(grad_out, query, own_key, own_value, out, lse, 0.0, True, scale=ctx.scale)
        return dq_prefix + dq_own, dk_prefix, dv_prefix, dk_own, dv_own, None


def _banded_mask(queries: int, q_start: int, k_start: int, keys: int, window: Optional[int], device) -> Tensor:
    """``[queries, keys]`` bool: query at position ``q_start + i`` sees key ``k_start + j`` causally (and
    within `window` positions)."""
    q_pos = torch.arange(q_start, q_start + queries, device=device)[:, None]
    k_pos = torch.arange(k_start, k_start + keys, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= (q_pos - k_pos) < window
    return mask


def _sdpa(query, key, value, *, mask=None, causal=False, scale=None, dropout=0.0) -> Tensor:
    gqa = key.shape[1] != query.shape[1]
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, is_causal=causal, dropout_p=dropout, scale=scale, enable_gqa=gqa
    )


def causal_problem(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    prefix: int,
    window: Optional[int],
    scale: Optional[float],
    dropout: float,
    prefix_query: Optional[Tensor] = None,
) -> Tensor:
    """SDPA output ``[1, H, Lq, D]`` for queries that are the last ``Lq`` of ``Lk = prefix + Lq`` keys,
    causal (bottom-right aligned) and within `window` positions if given; no ``[Lq, Lk]`` tensor.

    `prefix_query` (the prefix's own queries) lets a problem the merged CPU kernel cannot take (attention
    dropout, float16) run as one causal call over the whole sequence, keeping the last ``Lq`` outputs."""
    lq, lk = query.shape[2], key.shape[2]
    if window is not None and window >= lk:
        window = None  # the window covers the whole problem
    if window is None and prefix == 0:
        return _sdpa(query, key, value, causal=True, scale=scale, dropout=dropout)
    if window is None and query.device.type == "cpu" and dropout == 0.0 and query.dtype in MERGED_DTYPES:
        return MergedCausalAttention.apply(
            query, key[:, :, :prefix], value[:, :, :prefix], key[:, :, prefix:], value[:, :, prefix:], scale
        )
    if window is None:
        from torch.nn.attention.bias import causal_lower_right

        if query.device.type == "cuda":  # flash / memory-efficient kernels take it without a mask
            return _sdpa(query, key, value, mask=causal_lower_right(lq, lk), scale=scale, dropout=dropout)
        if prefix_query is not None:  # the prefix's queries computed again and dropped: O(L), causal kernel
            whole = torch.cat([prefix_query, query], dim=2)
            return _sdpa(whole, key, value, causal=True, scale=scale, dropout=dropout)[:, :, prefix:]
        window = lk  # the blocks below, as a window that covers everything
    outputs = []
    block = max(WINDOW_BLOCK, min(window, lk))
    for start in range(0, lq, block):
        stop = min(lq, start + block)
        q_first = prefix + start  # position of the block's first query
        k_lo = max(0, q_first - window + 1)
        k_hi = prefix + stop
        mask = _banded_mask(stop - start, q_first, k_lo, k_hi - k_lo, window, query.device)
        outputs.append(
            _sdpa(
                query[:, :, start:stop],
                key[:, :, k_lo:k_hi],
                value[:, :, k_lo:k_hi],
                mask=mask,
                scale=scale,
                dropout=dropout,
            )
        )
    return torch.cat(outputs, dim=2)


def eager_problem(
    eager, module, query, key, value, prefix: int, window: Optional[int], dropout: float, **kwargs
) -> Tensor:
    """The family's eager attention on one problem with its own small mask; ``[1, H, Lq, D]``."""
    mask = _banded_mask(query.shape[2], prefix, 0, key.shape[2], window, query.device)
    additive = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill_(
        ~mask, torch.finfo(query.dtype).min
    )
    out, _ = eager(module, query, key, value, additive[None, None], dropout=dropout, **kwargs)
    return out.transpose(1, 2)  # eager returns [1, Lq, H, D]


# ---------------------------------------------------------------------------------------------
# The attention function transformers calls


def _problems(segment: Segment, query: Tensor, key: Tensor, value: Tensor):
    """The segment's causal problems ``(q, k, v, prefix, prefix queries)`` in column order (each ``[1, H, n, D]``):
    the shared part with the first branch as one causal problem, then each further branch over ``[shared; branch]``."""
    s, p = segment.start, segment.shared
    first = segment.branches[0] if segment.branches else 0
    own = slice(s, s + p + first)
    yield query[:, :, own], key[:, :, own], value[:, :, own], 0, None
    for start, size in list(zip(segment.branch_starts(), segment.branches))[1:]:
        if not size:
            continue
        branch = slice(start, start + size)
        if p == 0:
            yield query[:, :, branch], key[:, :, branch], value[:, :, branch], 0, None
            continue
        keys = torch.cat([key[:, :, s : s + p], key[:, :, branch]], dim=2)
        values = torch.cat([value[:, :, s : s + p], value[:, :, branch]], dim=2)
        yield query[:, :, branch], keys, values, p, query[:, :, s : s + p]


@torch.compiler.disable  # plain Python over a batch's segments: compiled layers run it eagerly, not per layout
def layout_attention(
    module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    layout: LayoutAttention,
    inner: str,
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    **kwargs,
) -> Tensor:
    """Attention of packed rows ``query [R, H, L, D]``, ``key/value [R, Hkv, L, D]``; returns ``[R, L, H, D]``."""
    window = layout.window(module)
    eager = _family_eager(module) if inner == "eager" else None
    unsupported = [k for k in ("s_aux", "sinks") if kwargs.get(k) is not None]
    if unsupported or (kwargs.get("softcap") is not None and eager is None):
        raise UnsupportedPattern(f"attention with {', '.join(unsupported) or 'softcap'} in a packed layout")
    rows = []
    for row_index, segments in enumerate(layout.by_row):
        q, k, v = query[row_index : row_index + 1], key[row_index : row_index + 1], value[row_index : row_index + 1]
        pieces, end = [], 0
        for segment in segments:
            for pq, pk, pv, prefix, prefix_q in _problems(segment, q, k, v):
                if eager is not None:
                    pieces.append(
                        eager_problem(
                            eager,
                            module,
                            pq,
                            pk,
                            pv,
                            prefix,
                            window,
                            dropout,
                            scaling=scaling,
                            softcap=kwargs.get("softcap"),
                        )
                    )
                else:
                    pieces.append(causal_problem(pq, pk, pv, prefix, window, scaling, dropout, prefix_q))
            end = segment.start + segment.length
        if end < layout.width:  # padding after the row's last segment attends to nothing it could change
            pieces.append(query.new_zeros((1, query.shape[1], layout.width - end, value.shape[-1])))
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous()


def layout_block_mask(layout: LayoutAttention, window: Optional[int], device):
    """FlexAttention's block mask for the layout (O(L) metadata in, O((L/128)²) blocks out)."""
    from torch.nn.attention.flex_attention import create_block_mask

    segment_ids, branches, positions = (
        t.to(device) for t in segment_columns(layout.segments, layout.rows, layout.width)
    )

    def visible(b, h, q, k):
        same = (segment_ids[b, q] == segment_ids[b, k]) & (segment_ids[b, q] >= 0) & (k <= q)
        branch = (branches[b, k] == 0) | (branches[b, k] == branches[b, q])
        mask = same & branch
        if window is not None:
            mask = mask & ((positions[b, q] - positions[b, k]) < window)
        return mask | ((q == k) & (segment_ids[b, q] < 0))  # padding sees itself: no empty rows

    # Compiled on CUDA, the mask function is evaluated a block at a time; uncompiled (CPU, forward only) it runs
    # over the whole [L, L] grid once per forward and window.
    return create_block_mask(
        visible,
        layout.rows,
        None,
        layout.width,
        layout.width,
        device=device,
        _compile=torch.device(device).type == "cuda",
    )


def flex_layout_attention(module, query, key, value, layout: LayoutAttention, scaling=None, softcap=None) -> Tensor:
    """FlexAttention over whole packed rows with the layout's block mask; ``[R, L, H, D]``."""
    from torch.nn.attention.flex_attention import flex_attention

    window = layout.window(module)
    if window not in layout.block_masks:  # built once per forward and window, shared by the layers
        layout.block_masks[window] = layout_block_mask(layout, window, query.device)
    score_mod = None
    if softcap is not None:

        def score_mod(score, b, h, q, k):
            return softcap * torch.tanh(score / softcap)

    kernel = _compiled_flex() if query.device.type == "cuda" else flex_attention
    out = kernel(
        query,
        key,
        value,
        score_mod=score_mod,
        block_mask=layout.block_masks[window],
        scale=scaling,
        enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.transpose(1, 2).contiguous()


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _family_eager(module):
    """The family's own ``eager_attention_forward`` (soft-capping and scalings are in it)."""
    family = sys.modules[type(module).__module__]
    return family.eager_attention_forward


def _attention_function(inner: str):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, dpokit_layout: Optional[LayoutAttention] = None, **kwargs):
        if dpokit_layout is not None and inner == "flex_attention":
            return flex_layout_attention(
                module, query, key, value, dpokit_layout, kwargs.get("scaling"), kwargs.get("softcap")
            ), None
        if dpokit_layout is not None:
            return layout_attention(module, query, key, value, dpokit_layout, inner, **kwargs), None
        if inner == "flex_attention":
            from transformers.integrations.flex_attention import flex_attention_forward

            return flex_attention_forward(module, query, key, value, attention_mask, **kwargs)
        own = sdpa_attention_forward if inner == "sdpa" else _family_eager(module)
        return own(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"dpokit_{inner}_attention"
    return attention


def _mask_function(inner: str):
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    own = ALL_MASK_ATTENTION_FUNCTIONS[inner]

    def mask(*args, **kwargs):
        return None if _LAYOUT_FORWARD.get() else own(*args, **kwargs)

    return mask


_REGISTERED: set[str] = set()


def _register(inner: str) -> str:
    name = PREFIX + inner
    if name not in _REGISTERED:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(name, _attention_function(inner))
        AttentionMaskInterface.register(name, _mask_function(inner))
        _REGISTERED.add(name)
    return name


def install(decoder) -> bool:
    """Route `decoder`'s attention through dpokit's function (same results without a layout); whether
    the layout attention is available for its implementation (``sdpa`` or ``eager``)."""
    config = decoder.config
    inner = attn_implementation_of(decoder)
    if inner not in INNER:
        return False
    if config._attn_implementation != PREFIX + inner:
        config._attn_implementation = _register(inner)
    return True


@contextlib.contextmanager
def kernels_at_every_width() -> Iterator[None]:
    """Packed rows of any width take the layout kernels (the start-up check runs them on short pairs)."""
    global DENSE_MAX_WIDTH
    saved, DENSE_MAX_WIDTH = DENSE_MAX_WIDTH, 0
    try:
        yield
    finally:
        DENSE_MAX_WIDTH = saved


@contextlib.contextmanager
def layout_forward() -> Iterator[None]:
    """While a layout forward runs, the wrapped mask functions build no mask (the metadata replaces it)."""
    token = _LAYOUT_FORWARD.set(True)
    try:
        yield
    finally:
        _LAYOUT_FORWARD.reset(token)
