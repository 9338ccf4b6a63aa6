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
    head: nn.Module,
    hidden: Tensor,
    input_ids: Tensor,
    completion_mask: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sequence completion log-probs from final hidden states.

    Args:
        hidden: ``[N, T, H]`` final hidden states; position ``t`` predicts token ``t+1``.
        completion_mask: ``[N, T]`` bool, True where the token is a completion token.

    Returns ``(logps [N] float32, token_counts [N] long, mean_logits [N] float32 detached)``.
    """
    n = input_ids.shape[0]
    predicts = completion_mask[:, 1:]  # [N, T-1]: position t predicts a completion token t+1
    rows, cols = predicts.nonzero(as_tuple=True)
    selected = hidden[:, :-1][rows, cols]  # [M, H], M = completion tokens in the batch
    targets = input_ids[:, 1:][rows, cols]  # [M]
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
    if token_logps:
        flat_logps = torch.cat(token_logps)
        flat_logits = torch.cat(token_mean_logits)
    else:
        flat_logps = hidden.new_zeros(0, dtype=torch.float32)
        flat_logits = hidden.new_zeros(0, dtype=torch.float32)
    logps = torch.zeros(n, dtype=torch.float32, device=device).index_add(0, rows, flat_logps)
    counts = torch.zeros(n, dtype=torch.long, device=device).index_add(0, rows, torch.ones_like(rows))
    logit_sums = torch.zeros(n, dtype=torch.float32, device=device).index_add(0, rows, flat_logits)
    mean_logits = logit_sums / counts.clamp(min=1)
    return logps, counts, mean_logits


def sequence_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    position_ids: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run `model`'s decoder on ``[N, T]`` inputs and return per-sequence completion log-probs.

    Returns ``(logps [N], token_counts [N], mean_logits [N])`` as in `completion_logps`.
    """
    decoder, head = decoder_and_head(model)
    outputs = decoder(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    )
    return completion_logps(head, outputs.last_hidden_state, input_ids, completion_mask, chunk_size)


def concatenated_forward(model: nn.Module, batch: PairBatch, chunk_size: int = DEFAULT_CHUNK_SIZE) -> ChosenRejectedOutputs:
    """One forward over chosen and rejected rows together (``[2B, T]``), split into pair outputs."""
    logps, counts, mean_logits = sequence_logps(
        model, batch.input_ids, batch.attention_mask, batch.completion_mask, chunk_size
    )
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
