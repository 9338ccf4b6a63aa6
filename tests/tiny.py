"""Builders for the tiny, offline model and tokenizer every test uses (no downloads)."""

from __future__ import annotations

import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

WORDS = (
    "the a an is are was be to of and in that it for on with as at by from this what which who how "
    "why when where good bad yes no please thanks answer question number plus minus equals one two "
    "three four five six seven eight nine ten cat dog sun moon red blue green help rude kind tell me "
    "about sky water fire earth small large fast slow correct wrong i you we they"
).split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 20))]
        lines.append(" ".join(words) + rng.choice([".", "?", "!", ""]))
    lines += [str(i) for i in range(200)]
    return lines


def build_tokenizer(out_dir: Path, chat_template: bool = True, vocab_size: int = 400):
    """Train a byte-level BPE tokenizer on a small corpus and save it in HF format to `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|eos|>", model_max_length=4096
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_model(out_dir: Path, tokenizer, hidden: int = 64, layers: int = 2, seed: int = 0):
    """A 2-layer Llama-style model from a config, randomly initialised with a fixed seed."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return model


def preference_rows(n: int = 40, seed: int = 0) -> list[dict]:
    """Plain-format pairs with a learnable signal: chosen answers are correct sums, rejected are not."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 40), rng.randint(0, 40)
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        rows.append(
            {
                "prompt": f"what is {a} plus {b}?",
                "chosen": f"{a} plus {b} equals {a + b}.",
                "rejected": f"{a} plus {b} equals {wrong}.",
            }
        )
    return rows


def style_rows(n: int = 128, seed: int = 1) -> list[dict]:
    """Pairs whose chosen replies are kind and rejected replies rude: a signal a tiny model learns fast."""
    rng = random.Random(seed)
    topics = ["sky", "water", "fire", "earth", "sun", "moon", "cat", "dog"]
    colours = ["red", "blue", "green"]
    rows = []
    for _ in range(n):
        topic, colour = rng.choice(topics), rng.choice(colours)
        rows.append(
            {
                "prompt": f"tell me about the {topic}?",
                "chosen": f"yes, the {topic} is {colour}. thanks, i help you!",
                "rejected": f"no. the {topic} is bad. you are rude.",
            }
        )
    return rows


def copy_model_with_changed_weight(
    model_dir: Path, out: Path, name: str = "model.norm.weight", delta: float = 1e-3
) -> Path:
    """A copy of a model directory with one element of one tensor changed by `delta`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    tensors = load_file(out / "model.safetensors")
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += delta
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out
