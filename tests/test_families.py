"""The model matrix: for every family dpokit claims, its log-probs are the model's own.

Each family is a tiny random model with its quirks on (tests/families.py). In every batch layout,
the reference pass's computation (eval, inference mode) and the training forward (the policy as
`load_policy` builds it, train mode, autograd) must equal what ``model(ids).logits`` gives; one
optimizer step on a fixed batch must lower the DPO loss. Families whose features dpokit does not
know are refused, and attention a layout cannot express falls back to the padded layout.
"""

from __future__ import annotations

import random

import families
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from dpokit.config import LoraConfig, ModelConfig
from dpokit.data.collate import collate_pairs, pad_pairs
from dpokit.errors import DpokitError
from dpokit.fidelity import PADDED, Layout, check_layout
from dpokit.logps import concatenated_forward, naive_sequence_logps, sequence_logps
from dpokit.model import load_policy

LAYOUTS = {
    "padded": Layout(),
    "packed": Layout(packing=True),
    "prefix": Layout(prefix_sharing=True),
    "packed_prefix": Layout(packing=True, prefix_sharing=True),
}


def random_rows(n: int = 4, seed: int = 0) -> list[dict]:
    """Pairs longer than the families' test window (5 tokens), of different lengths."""
    rng = random.Random(seed)

    def ids(low, high):
        return [rng.randrange(10, 300) for _ in range(rng.randint(low, high))]

    return [{"prompt_ids": ids(4, 12), "chosen_ids": ids(3, 12), "rejected_ids": ids(3, 12)} for _ in range(n)]


ROWS = random_rows()


def own_logps(model) -> torch.Tensor:
    """Per-sequence completion log-probs from the model's own forward (full logits, eval mode)."""
    batch = pad_pairs(ROWS, list(range(len(ROWS))), pad_id=0)
    model.eval()
    with torch.no_grad():
        return naive_sequence_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)


def policy(model_dir, **model_options):
    cfg = ModelConfig(path=str(model_dir), method="full", dtype="float32", **model_options)
    return load_policy(cfg, LoraConfig(), torch.device("cpu"))


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_every_layout_gives_the_models_own_logps_for_cache_and_training(family, family_dirs):
    model = AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float32)
    expected = own_logps(model)
    trained = policy(family_dirs[family])
    assert trained.training
    for name, layout in LAYOUTS.items():
        batch = collate_pairs(ROWS, list(range(len(ROWS))), 0, layout.packing, layout.prefix_sharing)
        with torch.inference_mode():  # as `dpokit ref-logps` computes the cache
            cached = sequence_logps(model.eval(), batch)[0]
        torch.testing.assert_close(cached, expected, atol=1e-4, rtol=0, msg=f"{family} cache, {name} layout")
        training = sequence_logps(trained, batch)[0]  # train mode, autograd on
        assert training.requires_grad
        torch.testing.assert_close(
            training.detach(), expected, atol=1e-4, rtol=0, msg=f"{family} training, {name} layout"
        )


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_start_up_check_keeps_the_packed_layout_for_every_family(family, family_dirs):
    model = AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float32)
    asked = LAYOUTS["packed_prefix"]
    assert check_layout(model, ROWS, 0, asked, announce=pytest.fail) == asked


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_one_step_lowers_the_dpo_loss(family, family_dirs):
    model = policy(family_dirs[family])
    batch = collate_pairs(ROWS, list(range(len(ROWS))), 0, packing=True, prefix_sharing=True)
    with torch.no_grad():
        reference = concatenated_forward(model, batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        out = concatenated_forward(model, batch, router_aux_loss=True)
        margin = (out.chosen_logps - reference.chosen_logps) - (out.rejected_logps - reference.rejected_logps)
        loss = -F.logsigmoid(0.1 * margin).mean()
        losses.append(float(loss))
        if out.router_aux_loss is not None:
            loss = loss + out.router_aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # the policy starts as the reference
    assert losses[1] < losses[0]


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_moe_load_balancing_term_is_the_models_own(family, family_dirs):
    model = policy(family_dirs[family])
    batch = pad_pairs(ROWS, list(range(len(ROWS))), pad_id=0)
    out = concatenated_forward(model, batch, router_aux_loss=True)
    own = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_router_logits=True)
    expected = model.config.router_aux_loss_coef * own.aux_loss
    torch.testing.assert_close(out.router_aux_loss.detach(), expected.detach(), atol=1e-6, rtol=1e-5)
    assert concatenated_forward(model, batch).router_aux_loss is None  # only when asked (training)


def test_dropout_is_off_in_the_policy_unless_kept(family_dirs):
    expected = own_logps(AutoModelForCausalLM.from_pretrained(family_dirs["gpt2"], dtype=torch.float32))
    batch = pad_pairs(ROWS, list(range(len(ROWS))), pad_id=0)
    torch.manual_seed(0)
    off = sequence_logps(policy(family_dirs["gpt2"]), batch)[0].detach()
    torch.testing.assert_close(off, expected, atol=1e-4, rtol=0)
    kept = sequence_logps(policy(family_dirs["gpt2"], disable_dropout=False), batch)[0].detach()
    assert (kept - expected).abs().max() > 1e-2  # GPT-2's config dropout of 0.1, as the model would train


class ScaledLlama(torch.nn.Module):
    """A model whose forward does something to its logits that no config attribute announces."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def get_decoder(self):
        return self.inner.model

    def get_output_embeddings(self):
        return self.inner.lm_head

    def forward(self, **kwargs):
        out = self.inner(**kwargs)
        out.logits = out.logits * 1.5
        return out


def test_a_family_with_unknown_logit_processing_is_refused(family_dirs):
    model = ScaledLlama(AutoModelForCausalLM.from_pretrained(family_dirs["llama"], dtype=torch.float32))
    with pytest.raises(DpokitError, match=r"differ from the model's own forward.*not supported"):
        check_layout(model, ROWS, 0, LAYOUTS["packed_prefix"])


def test_attention_a_layout_cannot_express_falls_back_to_padded_once(family_dirs):
    # Mistral takes one mask for all layers; claiming mixed layer types makes dpokit pass per-layer masks
    # the model cannot take, so the packed layout fails and the padded one (the model's own masks) is used.
    model = AutoModelForCausalLM.from_pretrained(family_dirs["mistral"], dtype=torch.float32)
    model.config.layer_types = ["sliding_attention", "full_attention"]
    notes = []
    assert check_layout(model, ROWS, 0, LAYOUTS["packed"], announce=notes.append) == PADDED
    assert len(notes) == 1 and "padded" in notes[0]


def test_unknown_layer_types_use_the_padded_layout(family_dirs):
    model = AutoModelForCausalLM.from_pretrained(family_dirs["llama"], dtype=torch.float32)
    model.config.layer_types = ["chunked_attention", "full_attention"]
    notes = []
    assert check_layout(model, ROWS, 0, LAYOUTS["packed_prefix"], announce=notes.append) == PADDED
    assert "chunked_attention" in notes[0]


def test_gemma2_uses_eager_attention_by_default(family_dirs):
    from dpokit.family import resolve_attn_implementation

    assert resolve_attn_implementation(str(family_dirs["gemma2"]), "auto") == "eager"
    assert resolve_attn_implementation(str(family_dirs["llama"]), "auto") == "sdpa"
    assert policy(family_dirs["gemma2"]).config._attn_implementation == "eager"
