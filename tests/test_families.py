"""The model matrix: for every family dpokit claims, its log-probs are the model's own.

Each family is a tiny random model with its quirks on (tests/families.py). In every batch layout,
the reference pass's computation (eval, inference mode) and the training forward (the policy as
`load_policy` builds it, train mode, autograd) must equal what ``model(ids).logits`` gives; one
optimizer step on a fixed batch must lower the DPO loss. Families whose features dpokit does not
know are refused, and attention a layout cannot express falls back to the padded layout.
"""

from __future__ import annotations

import contextlib
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


def layouts_of(family: str) -> dict[str, Layout]:
    """The layouts `family` trains in: every layout, or the padded one where no packed layout expresses it."""
    return {"padded": PADDED} if family in families.PADDED_ONLY else LAYOUTS


def policy(model_dir, **model_options):
    cfg = ModelConfig(path=str(model_dir), method="full", dtype="float32", **model_options)
    return load_policy(cfg, LoraConfig(), torch.device("cpu"))


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_every_layout_gives_the_models_own_logps_for_cache_and_training(family, family_dirs):
    model = AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float32)
    expected = own_logps(model)
    trained = policy(family_dirs[family])
    assert trained.training
    for name, layout in layouts_of(family).items():
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
def test_start_up_check_keeps_the_packed_layout_or_says_why_it_cannot(family, family_dirs):
    model = AutoModelForCausalLM.from_pretrained(family_dirs[family], dtype=torch.float32)
    asked = LAYOUTS["packed_prefix"]
    if family not in families.PADDED_ONLY:
        assert check_layout(model, ROWS, 0, asked, announce=pytest.fail) == asked
        return
    notes = []
    assert check_layout(model, ROWS, 0, asked, announce=notes.append) == PADDED
    assert len(notes) == 1 and families.PADDED_ONLY[family] in notes[0] and "using the padded layout" in notes[0]


@pytest.mark.parametrize("family", list(families.FAMILIES))
def test_one_step_lowers_the_dpo_loss_with_finite_gradients(family, family_dirs):
    model = policy(family_dirs[family])
    layout = list(layouts_of(family).values())[-1]  # packed + prefix-shared where the family allows it
    batch = collate_pairs(ROWS, list(range(len(ROWS))), 0, layout.packing, layout.prefix_sharing)
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
        nonfinite = [name for name, p in model.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
        assert not nonfinite, f"{family}: non-finite gradients in {nonfinite[:3]}"
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

    def get_input_embeddings(self):
        return self.inner.model.embed_tokens

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


def test_a_packed_row_ending_in_zero_embedding_padding_trains_gemma3n_with_finite_gradients(family_dirs):
    from dpokit.attention import kernels_at_every_width

    model = policy(family_dirs["gemma3n_text"])  # bias-free, norms without an epsilon
    pad = model.config.pad_token_id
    assert not model.get_input_embeddings().weight[pad].any()  # the pad id's embedding is zero
    batch = collate_pairs(ROWS, list(range(len(ROWS))), pad, packing=True, prefix_sharing=True)
    assert (batch.token_mask == 0).any()  # some row ends in padding
    for widths in (contextlib.nullcontext(), kernels_at_every_width()):  # the dense mask, then the layout kernels
        with widths:
            out = concatenated_forward(model, batch)
            model.zero_grad()
            (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(g.isfinite().all() for g in grads)
        torch.testing.assert_close(
            torch.cat([out.chosen_logps, out.rejected_logps]).detach(), own_logps(model), atol=1e-4, rtol=0
        )


def test_llama4_text_decoder_is_found_by_structure_not_by_get_decoder(family_dirs):
    from dpokit.logps import decoder_and_head

    model = AutoModelForCausalLM.from_pretrained(family_dirs["llama4_text"], dtype=torch.float32)
    assert model.get_decoder() is model  # transformers' guess from base_model_prefix
    decoder, head = decoder_and_head(model)
    assert decoder is model.model and head is model.lm_head


def test_a_model_without_a_decoder_is_one_clear_error():
    from dpokit.logps import decoder_and_head

    with pytest.raises(DpokitError, match=r"Linear is not a causal LM dpokit can split into a decoder"):
        decoder_and_head(torch.nn.Linear(2, 2))


def test_train_mode_randomness_is_off_in_the_policy_and_every_known_source_is_covered(family_dirs):
    import glob
    import os
    import re

    import transformers

    from dpokit.model import RANDOM_SETTINGS, STOCHASTIC_IN_TRAIN_MODE

    expected = own_logps(AutoModelForCausalLM.from_pretrained(family_dirs["phimoe"], dtype=torch.float32))
    trained = policy(family_dirs["phimoe"])
    assert trained.training
    batch = pad_pairs(ROWS, list(range(len(ROWS))), pad_id=0)
    for _ in range(2):  # Gumbel-sampled routing and input jitter would differ between calls and from eval
        torch.testing.assert_close(sequence_logps(trained, batch)[0].detach(), expected, atol=1e-4, rtol=0)
    kept = policy(family_dirs["phimoe"], disable_dropout=False)
    assert (sequence_logps(kept, batch)[0].detach() - expected).abs().max() > 1e-3  # as the family trains

    # Every module class of a causal LM family's modeling file whose train mode draws random numbers is either
    # kept in eval mode or driven by a setting disable_dropout zeroes (dropout, LayerDrop, drop path).
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    root = os.path.dirname(transformers.__file__)
    uncovered = []
    for family in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        for path in glob.glob(f"{root}/models/{family}/modeling_*.py"):
            lines, cls = open(path).read().splitlines(), None
            for index, line in enumerate(lines):
                found = re.match(r"class (\w+)\(", line)
                cls = found.group(1) if found else cls
                around = " ".join(lines[max(0, index - 3) : index + 4]).lower()
                if "self.training" not in line or "checkpointing" in line:
                    continue
                if not re.search(
                    r"rand|uniform|gumbel|jitter|noise|bernoulli|multinomial|training=self.training", around
                ):
                    continue
                if cls not in STOCHASTIC_IN_TRAIN_MODE and not any(word in around for word in RANDOM_SETTINGS):
                    uncovered.append(f"{family}: {cls}: {line.strip()}")
    assert not uncovered, uncovered


def test_step_zero_names_train_mode_randomness_when_train_and_eval_differ(family_dirs, prepared_dir, tmp_path, capsys):
    from dpokit.cli import main

    args = [
        "train",
        "--config",
        "tiny_lora",
        "--model",
        str(family_dirs["gpt2"]),
        "--data",
        str(prepared_dir),
        "--ref",
        "live",
        "--method",
        "full",
        "--max-steps",
        "1",
        "--out",
        str(tmp_path / "run"),
    ]
    assert main([*args, "model.disable_dropout=false"]) == 1  # GPT-2 trains with its config's dropout of 0.1
    err = capsys.readouterr().err
    assert "because its train-mode forward is random: the same batch gives other log-probs in eval mode" in err
    assert "model.disable_dropout=false (set it true)" in err
    assert main([*args, "--overwrite"]) == 0  # dropout off: the policy starts as the reference
