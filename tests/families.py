"""Tiny random models of every family dpokit claims, each with its own quirks switched on.

Each entry builds a 2-layer config from transformers' own config class with the feature that makes
the family differ from Llama turned on: sliding windows shorter than the test sequences, mixed
sliding and full layers, logit soft-capping, logit scales, mixture-of-experts routing, dropout.
Weights are initialised with a large std so that logits are far from uniform and soft-capping or a
logit scale changes the log-probs by whole nats (a default 0.02 init would hide them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

WINDOW = 5  # shorter than every test sequence, so sliding-window layers really slide
INIT_STD = 0.3

COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    initializer_range=INIT_STD,
)


def _llama(**ids):
    from transformers import LlamaConfig

    return LlamaConfig(**COMMON, **ids)


def _qwen2(**ids):
    from transformers import Qwen2Config

    # max_window_layers=1: layer 0 full, layer 1 sliding (Qwen2's own mixed pattern).
    return Qwen2Config(**COMMON, **ids, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)


def _qwen3(**ids):
    from transformers import Qwen3Config

    return Qwen3Config(**COMMON, **ids, head_dim=8)


def _mistral(**ids):
    from transformers import MistralConfig

    return MistralConfig(**COMMON, **ids, sliding_window=WINDOW)


def _mixtral(**ids):
    from transformers import MixtralConfig

    return MixtralConfig(
        **COMMON,
        **ids,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=WINDOW,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
    )


def _qwen2_moe(**ids):
    from transformers import Qwen2MoeConfig

    return Qwen2MoeConfig(
        **COMMON,
        **ids,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        decoder_sparse_step=1,
        output_router_logits=True,
    )


def _gemma(**ids):
    from transformers import GemmaConfig

    return GemmaConfig(**COMMON, **ids, head_dim=8)


def _gemma2(**ids):
    from transformers import Gemma2Config

    return Gemma2Config(
        **COMMON,
        **ids,
        head_dim=8,
        sliding_window=WINDOW,
        final_logit_softcapping=3.0,
        attn_logit_softcapping=5.0,
        query_pre_attn_scalar=8,
    )


def _gemma3_text(**ids):
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **COMMON,
        **ids,
        head_dim=8,
        sliding_window=WINDOW,
        final_logit_softcapping=3.0,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=8,
    )


def _phi3(**ids):
    from transformers import Phi3Config

    return Phi3Config(**COMMON, **ids, sliding_window=WINDOW)


def _olmo2(**ids):
    from transformers import Olmo2Config

    return Olmo2Config(**COMMON, **ids)


def _granite(**ids):
    from transformers import GraniteConfig

    return GraniteConfig(
        **COMMON,
        **ids,
        logits_scaling=0.25,
        embedding_multiplier=2.0,
        residual_multiplier=0.5,
        attention_multiplier=0.2,
    )


def _cohere(**ids):
    from transformers import CohereConfig

    return CohereConfig(**COMMON, **ids, logit_scale=4.0)


def _gpt_neox(**ids):
    from transformers import GPTNeoXConfig

    common = {k: v for k, v in COMMON.items() if k != "num_key_value_heads"}
    return GPTNeoXConfig(**common, **ids, rotary_pct=0.5)


def _gpt2(**ids):
    from transformers import GPT2Config

    return GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=256,
        initializer_range=INIT_STD,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.1,
        **ids,
    )


def _llama4_text(**ids):
    from transformers import Llama4TextConfig

    # Its quirks: chunked attention (chunks of WINDOW tokens), NoPE layers (every second), MoE in every layer,
    # and a causal LM whose `get_decoder()` is itself (base_model_prefix "language_model", decoder at .model).
    return Llama4TextConfig(
        **COMMON,
        **ids,
        intermediate_size_mlp=64,
        head_dim=8,
        num_local_experts=2,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,
        attention_chunk_size=WINDOW,
        no_rope_layer_interval=2,
    )


def _gemma3n_text(**ids):
    from transformers import Gemma3nTextConfig

    # Its quirks: norms without an epsilon (NaN gradients at an all-zero hidden state, such as a zero pad
    # embedding through a bias-free model), AltUp, per-layer inputs, LAuReL, mixed sliding and full layers.
    return Gemma3nTextConfig(
        **COMMON,
        **ids,
        head_dim=8,
        sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        vocab_size_per_layer_input=ids["vocab_size"],
        hidden_size_per_layer_input=8,
        laurel_rank=4,
        num_kv_shared_layers=0,
        activation_sparsity_pattern=[0.0, 0.0],
        altup_num_inputs=2,
    )


def _phimoe(**ids):
    from transformers import PhimoeConfig

    # Its quirk: in train mode the router samples experts (Gumbel noise) and jitters its input.
    return PhimoeConfig(
        **COMMON, **ids, num_local_experts=4, num_experts_per_tok=2, input_jitter_noise=0.1, sliding_window=None
    )


def _falcon_h1(**ids):
    from transformers import FalconH1Config

    # Its quirks: Mamba-2 mixers beside attention (the packed layouts cannot express them: padded) and logits
    # multiplied by lm_head_multiplier in the causal LM's forward.
    return FalconH1Config(
        **COMMON,
        **ids,
        mamba_d_ssm=32,
        mamba_n_heads=4,
        mamba_d_head=8,
        mamba_n_groups=1,
        mamba_d_state=8,
        mamba_chunk_size=8,
        lm_head_multiplier=0.5,
    )


FAMILIES: dict[str, Callable] = {
    "llama": _llama,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "mistral": _mistral,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3_text": _gemma3_text,
    "phi3": _phi3,
    "olmo2": _olmo2,
    "granite": _granite,
    "cohere": _cohere,
    "gpt_neox": _gpt_neox,
    "gpt2": _gpt2,
    "llama4_text": _llama4_text,
    "gemma3n_text": _gemma3n_text,
    "phimoe": _phimoe,
    "falcon_h1": _falcon_h1,
}
# Families whose attention (or mixer) no packed layout expresses: the start-up check picks the padded layout.
PADDED_ONLY = {"llama4_text": "chunked_attention", "falcon_h1": "hybrid"}


def build_family_model(name: str, out_dir: Path, tokenizer, seed: int = 0):
    """Save a tiny random model of family `name` (and `tokenizer`) to `out_dir`; returns the model."""
    import torch
    from transformers import AutoModelForCausalLM

    config = FAMILIES[name](
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model
