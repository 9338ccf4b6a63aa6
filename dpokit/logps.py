"""The one log-probability function: used by the reference cache, the live reference and the policy.

``logp = sum_t log p(y_t | y_<t)`` over completion tokens only, with logits up-cast to float32 before
the log-softmax and the sum kept in float32.

Memory: the decoder runs once over the batch; the vocabulary projection then runs only on the
positions that predict a completion token, a chunk at a time. A chunk holds as many positions as fit
a byte budget for its float32 ``[n, V]`` logits (`chunk_positions`: 32 MiB on CPU, the largest block
glibc's allocator reuses instead of mmap-ing and page-faulting it afresh each time, and the fastest
measured; 256 MiB on CUDA), or a fixed
``chunk_size``. Backward never keeps a chunk's logits: for a plain linear head `FusedChunkLogps`
recomputes them and writes the projection's gradient directly (``onehot - softmax``); other heads
(LoRA on the head, soft-capping, extra token statistics, autocast) checkpoint the chunk instead.
Peak memory for the logits is one chunk, never ``[2B, T, V]``.
"""

from __future__ import annotations

import sys
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dpokit import attention
from dpokit.data.collate import dense_mask
from dpokit.errors import DpokitError
from dpokit.family import attn_implementation_of, decoder_masks, logits_transform
from dpokit.types import (
    ChosenRejectedOutputs,
    PairBatch,
    RankedOutputs,
    pair_scores,
    ranked_token_values,
    split_token_values,
)

DEFAULT_CHUNK_SIZE = None  # positions per chunk from the byte budget (`chunk_positions`)
CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 256 << 20}  # float32 logits per chunk (bench/logps_chunk_results.md)


def chunk_positions(vocab_size: int, device: torch.device, chunk_size: Optional[int] = None) -> int:
    """Positions per chunk of the vocabulary projection: `chunk_size` if given, else what fits the device's
    byte budget for float32 logits (at least 1)."""
    if chunk_size:
        return int(chunk_size)
    budget = CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"])
    return max(1, budget // (4 * vocab_size))


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (returns final hidden states) and the output projection of a causal LM.

    Found by structure, not by ``get_decoder()`` (whose guess from ``base_model_prefix`` returns the whole
    causal LM for Llama 4): the decoder is the module that directly holds the input embeddings (walked up
    to the nearest transformers model below the causal LM, for families that keep embeddings in a
    sub-module). Works for plain transformers models and for peft-wrapped ones (adapters stay active).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    decoder = _decoder_of(base)
    if decoder is None or head is None:
        raise DpokitError(
            f"{type(base).__name__} is not a causal LM dpokit can split into a decoder and an output projection "
            "(no module holds its input embeddings, or it has no output embeddings); load a *ForCausalLM model"
        )
    return decoder, head


def _decoder_of(base: nn.Module) -> Optional[nn.Module]:
    from transformers import PreTrainedModel

    embeddings = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if embeddings is None:
        return None
    names = {id(module): name for name, module in base.named_modules()}
    path = names.get(id(embeddings))
    if not path or "." not in path:
        return None  # the embeddings sit on the causal LM itself: no separate decoder
    parts = path.split(".")[:-1]
    candidates = [base.get_submodule(".".join(parts[:n])) for n in range(len(parts), 0, -1)]
    owner = candidates[0]
    if isinstance(owner, PreTrainedModel) or hasattr(owner, "layers") or hasattr(owner, "h"):
        return owner
    return next((module for module in candidates if isinstance(module, PreTrainedModel)), None)


def output_head(model: nn.Module) -> tuple[nn.Module, Optional[Callable[[Tensor], Tensor]]]:
    """The output projection and what the family's forward does to its logits (`dpokit.family`)."""
    _, head = decoder_and_head(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return head, logits_transform(base.config)


TOKEN_STATS = ("log_sq_norm", "entropy")  # full-vocabulary values a loss may ask for (`ChosenRejectedOutputs`)


class Completions(NamedTuple):
    """Per-output values of a batch's completions (pairs: outputs ``0..B-1`` chosen, ``B..2B-1`` rejected; ranked
    groups: each group's completions after the groups before it)."""

    logps: Tensor  # [outputs] float32 sums over completion tokens
    counts: Tensor  # [outputs] long
    mean_logits: Tensor  # [outputs] float32, detached
    token_logps: Tensor  # [M] float32, every completion token, grouped by output in token order
    token_slots: Tensor  # [M] long, the output of each token
    token_stats: Tensor  # [M, len(stats)] float32, the requested `TOKEN_STATS`


class FusedChunkLogps(torch.autograd.Function):
    """log p(target) and the mean logit for rows of `hidden` ``[n, H]`` under a linear head, whose backward
    computes the projection's gradient directly: ``d logp / d logits = onehot - softmax``. Equal to
    checkpointing `_chunk_token_logps` (tests/test_logps.py) without autograd's graph over the ``[n, V]``
    logits in backward.

    With `keep_softmax` the chunk's softmax is kept for backward (``[n, V]`` float32, within the logits byte
    budget): the batch's only chunk on short pairs, where recomputing the logits in backward was a quarter
    of the projection's time. Otherwise backward recomputes the logits, so no chunk outlives its forward.
    """

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, keep_softmax: bool = False
    ):
        logits = F.linear(hidden, weight, bias).float()  # [n, V]
        normaliser = torch.logsumexp(logits, dim=-1)
        token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normaliser
        mean_logits = logits.mean(dim=-1)
        ctx.keep_softmax = keep_softmax
        if keep_softmax:  # the logits are not needed again: become the softmax in place
            ctx.save_for_backward(hidden, weight, bias, targets, logits.sub_(normaliser.unsqueeze(-1)).exp_())
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, normaliser)
        return token_logps, mean_logits

    @staticmethod
    def backward(
        ctx, grad_logps: Tensor, grad_mean_logits: Optional[Tensor]
    ):  # the mean logit is a detached diagnostic
        hidden, weight, bias, targets, saved = ctx.saved_tensors
        if ctx.keep_softmax:  # -softmax * g, in the softmax's own memory: it is not read again
            grad_logits = saved.mul_(-grad_logps.unsqueeze(-1))
        else:
            logits = F.linear(hidden, weight, bias).float()
            grad_logits = torch.exp(logits.sub_(saved.unsqueeze(-1))).mul_(-grad_logps.unsqueeze(-1))
        grad_logits.scatter_add_(-1, targets.unsqueeze(-1), grad_logps.unsqueeze(-1))  # + onehot * g
        grad_logits = grad_logits.to(hidden.dtype)
        grad_hidden = grad_logits @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_logits.transpose(0, 1) @ hidden if ctx.needs_input_grad[1] else None
        grad_bias = grad_logits.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None


def fused_head(head: nn.Module, transform, token_stats: tuple[str, ...], hidden: Tensor) -> bool:
    """Whether `FusedChunkLogps` computes exactly what this head does: a plain ``nn.Linear`` (not LoRA-wrapped,
    not sharded), no logit transform or token statistics, no autocast."""
    weight = getattr(head, "weight", None)
    return (
        type(head) is nn.Linear
        and transform is None
        and not token_stats
        and type(weight) is nn.Parameter
        and not hasattr(weight, "to_local")  # a DTensor under FSDP: the head's own forward gathers it
        and not torch.is_autocast_enabled(hidden.device.type)
        and weight.dtype == hidden.dtype
    )


def _chunk_token_logps(
    head: nn.Module,
    transform: Optional[Callable[[Tensor], Tensor]],
    hidden: Tensor,
    targets: Tensor,
    stats: tuple[str, ...] = (),
) -> tuple[Tensor, Tensor, Tensor]:
    """log p(target), the mean logit and the requested `stats` for each row of `hidden` [n, H]; float32."""
    logits = head(hidden).float()  # [n, V]
    if transform is not None:  # soft-capping, logit scales: the model's own logits
        logits = transform(logits)
    normaliser = torch.logsumexp(logits, dim=-1)
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - normaliser
    columns = []
    for name in stats:
        log_probs = logits - normaliser.unsqueeze(-1)
        if name == "log_sq_norm":  # log sum_v p(v)^2
            columns.append(torch.logsumexp(2 * log_probs, dim=-1))
        else:  # entropy, -sum_v p(v) log p(v)
            columns.append(-(log_probs.exp() * log_probs).sum(-1))
    extra = torch.stack(columns, dim=-1) if columns else logits.new_zeros((logits.shape[0], 0))
    return token_logps, logits.mean(dim=-1), extra


def completion_logps(
    head: nn.Module,
    hidden: Tensor,
    batch: PairBatch,
    chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
    transform: Optional[Callable[[Tensor], Tensor]] = None,
    token_stats: tuple[str, ...] = (),
) -> Completions:
    """Per-output completion log-probs from final hidden states ``[R, L, H]`` and the batch's targets.

    `token_stats` names full-vocabulary values (`TOKEN_STATS`) to compute per token in the same chunks;
    the common path asks for none and pays nothing for them.
    """
    unknown = [name for name in token_stats if name not in TOKEN_STATS]
    if unknown:
        raise ValueError(f"unknown token statistics {unknown}; available: {', '.join(TOKEN_STATS)}")
    num_outputs = batch.num_outputs
    # Each output's tokens lie in one row in increasing columns: order them by (output, column).
    order = torch.argsort(batch.target_slots * hidden.shape[1] + batch.target_cols)
    rows, cols = batch.target_rows[order], batch.target_cols[order]
    targets, slots = batch.target_ids[order], batch.target_slots[order]
    selected = hidden[rows, cols]  # [M, H], M = completion tokens in the batch
    use_checkpoint = torch.is_grad_enabled() and (
        selected.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    fused = use_checkpoint and fused_head(head, transform, token_stats, selected)
    step = chunk_positions(getattr(head, "out_features", 0) or head.weight.shape[0], hidden.device, chunk_size)
    token_logps, token_mean_logits, token_extras = [], [], []
    for start in range(0, selected.shape[0], step):
        stop = start + step
        if fused:
            keep_softmax = selected.shape[0] <= step  # one chunk: its softmax fits the byte budget until backward
            lp, ml = FusedChunkLogps.apply(
                selected[start:stop], head.weight, head.bias, targets[start:stop], keep_softmax
            )
            token_logps.append(lp)
            token_mean_logits.append(ml.detach())
            continue
        args = (head, transform, selected[start:stop], targets[start:stop], tuple(token_stats))
        lp, ml, extra = (
            checkpoint(_chunk_token_logps, *args, use_reentrant=False) if use_checkpoint else _chunk_token_logps(*args)
        )
        token_logps.append(lp)
        token_mean_logits.append(ml.detach())
        token_extras.append(extra)
    device = hidden.device
    empty = torch.zeros(0, dtype=torch.float32, device=device)
    flat_logps = torch.cat(token_logps) if token_logps else empty
    flat_logits = torch.cat(token_mean_logits) if token_mean_logits else empty
    flat_stats = (
        torch.cat(token_extras) if token_extras else torch.zeros((flat_logps.shape[0], len(token_stats)), device=device)
    )
    logps = torch.zeros(num_outputs, dtype=torch.float32, device=device).index_add(0, slots, flat_logps)
    counts = torch.zeros(num_outputs, dtype=torch.long, device=device).index_add(0, slots, torch.ones_like(slots))
    logit_sums = torch.zeros(num_outputs, dtype=torch.float32, device=device).index_add(0, slots, flat_logits)
    return Completions(logps, counts, logit_sums / counts.clamp(min=1), flat_logps, slots, flat_stats)


def dense_attention_mask(batch: PairBatch, decoder: nn.Module):
    """A packed batch's ``[R, 1, L, L]`` mask combined with the family's per-layer pattern (`dpokit.family`),
    as the decoder takes it: the old dense path, kept to check and benchmark the layout attention against,
    and used for attention implementations dpokit does not wrap."""
    dtype = decoder.get_input_embeddings().weight.dtype
    return decoder_masks(dense_mask(batch), batch.position_ids, decoder.config, attn_implementation_of(decoder), dtype)


def run_decoder(decoder: nn.Module, batch: PairBatch, dense: bool = False, **kwargs):
    """The decoder's outputs on the batch's rows. The padded layout passes its 2-D padding mask (the model
    builds its own causal and sliding-window masks); packed layouts pass their segments to
    `dpokit.attention`, which never builds an ``[L, L]`` mask. Rows of at most `attention.DENSE_MAX_WIDTH`
    columns (where it is cheaper), attention implementations dpokit does not wrap, and `dense` take the mask."""
    common = dict(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False, **kwargs)
    if batch.segments is None:
        return decoder(attention_mask=batch.attention_mask, **common)
    short = (
        batch.input_ids.shape[1] <= attention.DENSE_MAX_WIDTH and attn_implementation_of(decoder) != "flex_attention"
    )
    if dense or short or not attention.install(decoder):
        return decoder(attention_mask=dense_attention_mask(batch, decoder), **common)
    layout = attention.layout_for(batch.segments, batch.input_ids, decoder.config)
    with attention.layout_forward():
        return decoder(attention_mask=None, dpokit_layout=layout, **common)


def sequence_logps(
    model: nn.Module, batch: PairBatch, chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE, router_aux_loss: bool = False
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """``(logps, token_counts, mean_logits, aux)`` of `model` on the batch, per output (``[2B]`` for pairs)."""
    hidden, aux = decoder_hidden_states(model, batch, router_aux_loss)
    completions = head_logps(model, hidden, batch, chunk_size)
    return completions.logps, completions.counts, completions.mean_logits, aux


def decoder_hidden_states(
    model: nn.Module, batch: PairBatch, router_aux_loss: bool = False
) -> tuple[Tensor, Optional[Tensor]]:
    """`model`'s decoder over the batch's rows, whatever the layout (the attention from ``batch.segments`` or
    its masks): the last hidden states ``[R, L, H]``, and the mixture-of-experts load-balancing loss over the
    batch's real tokens when `router_aux_loss` is set and the model config asks for it (``output_router_logits``),
    else None."""
    decoder, _ = decoder_and_head(model)
    with_router = router_aux_loss and bool(getattr(decoder.config, "output_router_logits", False))
    kwargs = {"output_router_logits": True} if with_router else {}
    outputs = run_decoder(decoder, batch, **kwargs)
    aux = moe_load_balancing_loss(model, outputs.router_logits, batch.token_mask) if with_router else None
    return outputs.last_hidden_state, aux


def head_logps(
    model: nn.Module,
    hidden: Tensor,
    batch: PairBatch,
    chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
    token_stats: tuple[str, ...] = (),
) -> Completions:
    """`model`'s output head on the completion positions of `hidden` only, fused with the log-softmax: the
    vocabulary projection in chunks (fp32 log-softmax, no ``[R, L, V]`` logits), the family's logit transform,
    and per completion its summed log-prob, mean logit, token count and per-token values (`Completions`)."""
    head, transform = output_head(model)
    return completion_logps(head, hidden, batch, chunk_size, transform, token_stats)


def moe_load_balancing_loss(model: nn.Module, router_logits, token_mask: Tensor) -> Optional[Tensor]:
    """The family's own load-balancing loss (Switch Transformer), times the config's coefficient."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    family = sys.modules[type(base).__module__]
    loss_fn = getattr(family, "load_balancing_loss_func", None)
    if loss_fn is None or not router_logits:
        return None
    config = base.config
    num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    loss = loss_fn(tuple(router_logits), num_experts, config.num_experts_per_tok, token_mask)
    return config.router_aux_loss_coef * loss


def concatenated_forward(
    model: nn.Module,
    batch: PairBatch,
    chunk_size: Optional[int] = DEFAULT_CHUNK_SIZE,
    router_aux_loss: bool = False,
    token_stats: tuple[str, ...] = (),
) -> ChosenRejectedOutputs | RankedOutputs:
    """One forward over every completion of the batch together (one pass, whatever the layout), split per pair
    (or per ranked group), with per-token log-probs and the requested full-vocabulary `token_stats`
    (`TOKEN_STATS`). The recipe's ``policy_logps`` makes the same three calls."""
    hidden, aux = decoder_hidden_states(model, batch, router_aux_loss)  # [R, L, H]
    completions = head_logps(model, hidden, batch, chunk_size, token_stats)
    return batch_outputs(completions, batch, token_stats, aux)


def batch_outputs(
    done: Completions, batch: PairBatch, token_stats: tuple[str, ...] = (), router_aux_loss: Optional[Tensor] = None
) -> ChosenRejectedOutputs | RankedOutputs:
    """`Completions` as what a loss takes: `ChosenRejectedOutputs` for pairs (with the batch's scores when the pairs
    have them), `RankedOutputs` for ranked groups."""
    if batch.is_grouped:
        return ranked_outputs(done, batch, token_stats, router_aux_loss)
    return chosen_rejected_outputs(done, batch.num_pairs, token_stats, router_aux_loss, batch.slot_counts, batch.scores)


def ranked_outputs(
    done: Completions, batch: PairBatch, token_stats: tuple[str, ...] = (), router_aux_loss: Optional[Tensor] = None
) -> RankedOutputs:
    """`Completions` of a ranked batch: ``[C]`` per completion (with the batch's scores), ``[C, T]`` per token."""
    outputs = batch.num_outputs
    token_logps, token_mask = ranked_token_values(done.token_logps, done.token_slots, outputs, batch.slot_counts)
    stats = {
        name: ranked_token_values(done.token_stats[:, k], done.token_slots, outputs, batch.slot_counts)[0]
        for k, name in enumerate(token_stats)
    }
    host_scores = torch.tensor(batch.scores, dtype=torch.float32)
    return RankedOutputs(
        logps=done.logps,
        group_sizes=tuple(batch.group_sizes),
        scores=host_scores.to(done.logps.device, non_blocking=True),
        host_scores=host_scores,
        tokens=done.counts,
        mean_logits=done.mean_logits,
        router_aux_loss=router_aux_loss,
        token_logps=token_logps,
        token_mask=token_mask,
        token_stats=stats,
    )


def chosen_rejected_outputs(
    done: Completions,
    num_pairs: int,
    token_stats: tuple[str, ...] = (),
    router_aux_loss: Optional[Tensor] = None,
    slot_counts: Optional[Sequence[int]] = None,
    scores: Optional[Sequence[float]] = None,
) -> ChosenRejectedOutputs:
    """`Completions` (chosen ones first, then rejected) split per pair: ``[B]`` sums, ``[B, T]`` per token.
    `slot_counts` (``PairBatch.slot_counts``) sizes the per-token tensors without reading the device; `scores`
    (``PairBatch.scores`` of pairs prepared with scores) become ``chosen_scores``/``rejected_scores``."""
    b = num_pairs
    chosen_tokens, chosen_mask, rejected_tokens, rejected_mask = split_token_values(
        done.token_logps, done.token_slots, b, slot_counts
    )
    stats = {}
    for k, name in enumerate(token_stats):
        chosen_stat, _, rejected_stat, _ = split_token_values(done.token_stats[:, k], done.token_slots, b, slot_counts)
        stats[name] = (chosen_stat, rejected_stat)
    chosen_scores, rejected_scores = pair_scores(scores, b, done.logps.device)
    return ChosenRejectedOutputs(
        chosen_logps=done.logps[:b],
        rejected_logps=done.logps[b:],
        chosen_logits=done.mean_logits[:b],
        rejected_logits=done.mean_logits[b:],
        chosen_tokens=done.counts[:b],
        rejected_tokens=done.counts[b:],
        router_aux_loss=router_aux_loss,
        chosen_token_logps=chosen_tokens,
        rejected_token_logps=rejected_tokens,
        chosen_token_mask=chosen_mask,
        rejected_token_mask=rejected_mask,
        token_stats=stats,
        chosen_scores=chosen_scores,
        rejected_scores=rejected_scores,
    )


def naive_sequence_logps(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> Tensor:
    """The plain computation (full ``[N, T, V]`` float32 logits), kept to check and benchmark against."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logps * completion_mask[:, 1:].to(token_logps.dtype)).sum(-1)


# ---------------------------------------------------------------------------------------------
# Generation (eval samples) through the same decoder and head


@torch.no_grad()
def generate_reply(
    model: nn.Module,
    prompt_ids: list[int],
    max_new_tokens: int,
    temperature: float,
    stop_ids: set[int],
    device: torch.device,
) -> list[int]:
    """The reply's token ids: greedy, or sampled at `temperature` from the global RNG, up to a token of `stop_ids`
    (kept, as `generate` keeps it). Without a KV cache: a sample is a few dozen tokens, and every process of
    an FSDP run takes the same steps, so their collective forwards stay in step."""
    # The decoder, the output head and the family's logit transform, called as training calls them (under FSDP2 they
    # are the units dpokit runs; the root module's forward is never used): `model(ids).logits[:, -1]` in float32.
    decoder, _ = decoder_and_head(model)
    head, transform = output_head(model)
    ids = torch.tensor([prompt_ids], device=device)
    reply: list[int] = []
    for _ in range(max_new_tokens):
        logits = head(decoder(input_ids=ids, use_cache=False).last_hidden_state[:, -1]).float()
        logits = (transform(logits) if transform is not None else logits)[0]
        if temperature > 0:
            token = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1))
        else:
            token = int(logits.argmax())
        reply.append(token)
        if token in stop_ids:
            break
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
    return reply


__all__ = [
    "batch_outputs",
    "completion_logps",
    "generate_reply",
    "concatenated_forward",
    "decoder_and_head",
    "run_decoder",
    "output_head",
    "naive_sequence_logps",
    "sequence_logps",
]
