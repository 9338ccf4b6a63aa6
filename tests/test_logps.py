"""The one log-prob function equals the plain full-logits computation, values and gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpokit.data.collate import pad_pairs
from dpokit.logps import concatenated_forward, naive_sequence_logps, sequence_logps

ROWS = [
    {"prompt_ids": [3, 40, 41, 42, 5, 4], "chosen_ids": [50, 51, 52, 5], "rejected_ids": [60, 5]},
    {"prompt_ids": [3, 43, 5, 4], "chosen_ids": [53, 54, 55, 56, 57, 5], "rejected_ids": [61, 62, 5]},
    {"prompt_ids": [3, 44, 45, 5, 4], "chosen_ids": [58, 5], "rejected_ids": [63, 64, 65, 66, 67, 68, 5]},
]


@pytest.fixture()
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.mark.parametrize("chunk_size", [1, 4, 1024])
def test_chunked_logps_equal_full_logits(model, chunk_size):
    batch = pad_pairs(ROWS, [0, 1, 2], pad_id=0)
    with torch.no_grad():
        logps, counts, _ = sequence_logps(
            model, batch.input_ids, batch.attention_mask, batch.completion_mask, chunk_size
        )
        expected = naive_sequence_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, expected, atol=1e-5, rtol=0)
    assert counts.tolist() == [4, 6, 2, 2, 3, 7]


def test_chunked_logps_gradients_equal_full_logits(model):
    batch = pad_pairs(ROWS, [0, 1, 2], pad_id=0)
    out = concatenated_forward(model, batch, chunk_size=3)
    (out.chosen_logps - 0.5 * out.rejected_logps).sum().backward()
    chunked = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    full = naive_sequence_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)
    (full[:3] - 0.5 * full[3:]).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(chunked[name], param.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_logps_do_not_depend_on_batch_composition(model):
    together = pad_pairs(ROWS, [0, 1, 2], pad_id=0)
    with torch.no_grad():
        joint = concatenated_forward(model, together)
        alone = [concatenated_forward(model, pad_pairs([row], [i], pad_id=0)) for i, row in enumerate(ROWS)]
    torch.testing.assert_close(joint.chosen_logps, torch.cat([a.chosen_logps for a in alone]), atol=1e-5, rtol=0)
    torch.testing.assert_close(joint.rejected_logps, torch.cat([a.rejected_logps for a in alone]), atol=1e-5, rtol=0)
