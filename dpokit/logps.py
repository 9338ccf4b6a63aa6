"""The one log-probability function: used by the reference cache, the live reference and the policy.

``logp = sum_t log p(y_t | y_<t)`` over completion tokens only, with logits up-cast to float32 before
the log-softmax and the sum kept in float32.

Memory: the decoder runs once over the batch; the vocabulary projection then runs only on the
positions that predict a completion token, ``chunk_size`` positions at a time. Under autograd each
chunk is checkpointed, so backward recomputes that chunk's logits instead of keeping them: peak
memory for the logits is ``chunk_size x V`` floats, never ``[2B, T, V]``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dpokit.data.collate import PairBatch
from dpokit.losses import ChosenRejectedOutputs

DEFAULT_CHUNK_SIZE = 1024


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The decoder stack (returns final hidden states) and the output projection of a causal LM.

    Works for plain transformers models and for peft-wrapped ones (adapters stay active).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    head = base.get_output_embeddings()
    if decoder is None or head is None:
        raise TypeError(f"{type(base).__name__} is not a causal LM with a decoder and an output projection")
    return decoder, head


def _chunk_token_logps(head: nn.Module, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """log p(target) and the mean logit for each row of `hidden` [n, H]; float32 throughout."""
    logits = head(hidden).float()  # [n, V]
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return token_logps, logits.mean(dim=-1)


def completion_logps(
    head: nn.Module, hidden: Tensor, batch: PairBatch, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-output completion log-probs from final hidden states ``[R, L, H]`` and the batch's targets.

    Returns ``(logps [2B] float32, token_counts [2B] long, mean_logits [2B] float32 detached)``:
    entries ``0..B-1`` are the chosen completions, ``B..2B-1`` the rejected ones.
    """
    num_outputs = 2 * batch.num_pairs
    selected = hidden[batch.target_rows, batch.target_cols]  # [M, H], M = completion tokens in the batch
    targets, slots = batch.target_ids, batch.target_slots
    use_checkpoint = torch.is_grad_enabled() and selected.requires_grad
    token_logps, token_mean_logits = [], []
    for start in range(0, selected.shape[0], chunk_size):
        stop = start + chunk_size
        if use_checkpoint:
            lp, ml = checkpoint(_chunk_token_logps, head, selected[start:stop], targets[start:stop], use_reentrant=False)
        else:
            lp, ml = _chunk_token_logps(head, selected[start:stop], targets[start:stop])
        token_logps.append(lp)
        token_mean_logits.append(ml.detach())
    device = hidden.device
    empty = torch.zeros(0, dtype=torch.float32, device=device)
    flat_logps = torch.cat(token_logps) if token_logps else empty
    flat_logits = torch.cat(token_mean_logits) if token_mean_logits else empty
    logps = torch.zeros(num_outputs, dtype=torch.float32, device=device).index_add(0, slots, flat_logps)
    counts = torch.zeros(num_outputs, dtype=torch.long, device=device).index_add(0, slots, torch.ones_like(slots))
    logit_sums = torch.zeros(num_outputs, dtype=torch.float32, device=device).index_add(0, slots, flat_logits)
    return logps, counts, logit_sums / counts.clamp(min=1)


def model_attention_mask(mask: Tensor, decoder: nn.Module) -> Tensor:
    """The mask as the decoder's attention takes it: SDPA takes a 4-D bool mask as is; eager
    attention adds the mask to its scores, so it gets the additive float form."""
    if mask.dim() != 4 or getattr(decoder.config, "_attn_implementation", "sdpa") != "eager":
        return mask
    dtype = decoder.get_input_embeddings().weight.dtype
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def sequence_logps(model: nn.Module, batch: PairBatch, chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[Tensor, Tensor, Tensor]:
    """Run `model`'s decoder on the batch's rows (any layout) and return per-output completion log-probs.

    Returns ``(logps [2B], token_counts [2B], mean_logits [2B])`` as in `completion_logps`.
    """
    decoder, head = decoder_and_head(model)
    outputs = decoder(
        input_ids=batch.input_ids,
        attention_mask=model_attention_mask(batch.attention_mask, decoder),
        position_ids=batch.position_ids,
        use_cache=False,
    )
    return completion_logps(head, outputs.last_hidden_state, batch, chunk_size)


def concatenated_forward(model: nn.Module, batch: PairBatch, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ChosenRejectedOutputs:
    """One forward over chosen and rejected together (one pass, whatever the layout), split per pair."""
    logps, counts, mean_logits = sequence_logps(model, batch, chunk_size)
    b = batch.num_pairs
    return ChosenRejectedOutputs(
        chosen_logps=logps[:b],
        rejected_logps=logps[b:],
        chosen_logits=mean_logits[:b],
        rejected_logits=mean_logits[b:],
        chosen_tokens=counts[:b],
        rejected_tokens=counts[b:],
    )


def naive_sequence_logps(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> Tensor:
    """The plain computation (full ``[N, T, V]`` float32 logits), kept to check and benchmark against."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token_logps * completion_mask[:, 1:].to(token_logps.dtype)).sum(-1)


__all__ = [
    "completion_logps",
    "concatenated_forward",
    "decoder_and_head",
    "naive_sequence_logps",
    "sequence_logps",
]
