"""Build the tiny demo model that `dpokit quickstart` tunes: a BPE tokenizer, a 1M-parameter Llama,
and a short supervised pass so that it speaks the demo's chat format.

    python examples/make_demo_data.py     # first: the data this script learns from
    python examples/make_demo_model.py    # writes examples/demo/model/ (a few minutes on 2 CPU cores)

Steps:
1. train a byte-level BPE tokenizer on the demo texts, with a chat template whose end-of-turn token
   ``<|end|>`` is also the EOS (generation stops there);
2. build a 4-layer Llama (hidden 128: small, so the whole quickstart runs in minutes on a CPU) from a config with a fixed seed;
3. supervised fine-tuning, a plain PyTorch loop: next-token loss on the reply tokens of every train
   pair, chosen *and* rejected. Learning both kinds of reply is the point: the model speaks the
   format, knows the answers, and is as likely to be rude as helpful, which DPO then fixes;
4. save it in float32 (safetensors, about 4 MB), with the tokenizer, and print a few greedy generations.

Seeded; one thread, so the same weights come out on any machine with the same library versions.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).parent
DEFAULT_DATA = HERE / "demo" / "data" / "train.jsonl"
DEFAULT_OUT = HERE / "demo" / "model"
SEED = 0

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
VOCAB_SIZE = 768

HIDDEN = 128
LAYERS = 4
SFT_STEPS = 600
SFT_BATCH = 32  # sequences per step
SFT_LR = 3e-3


def read_pairs(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer trained on `texts`, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>", model_max_length=512
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def demo_config(tokenizer, hidden: int = HIDDEN, layers: int = LAYERS, **extra):
    """A small Llama config over the demo tokenizer (4 heads, 2 key-value heads, 512 positions)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **extra,
    )


def build_model(tokenizer):
    """A small Llama-style causal LM, randomly initialised (seeded)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)
    config = demo_config(tokenizer, tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def sft_examples(tokenizer, pairs: list[dict[str, str]]) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) of every prompt + reply, chosen and rejected."""
    examples = []
    for pair in pairs:
        messages = [{"role": "user", "content": pair["prompt"]}]
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        for reply in (pair["chosen"], pair["rejected"]):
            full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}], tokenize=True)
            examples.append((list(full["input_ids"]), len(prompt_ids)))
    return examples


def sft_batch(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and labels (-100 on prompt and padding positions)."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), -100)
    for row, (ids, prompt_length) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, prompt_length : len(ids)] = torch.tensor(ids[prompt_length:])
    return input_ids, labels


def warmup_cosine(optimizer, steps: int):
    """Linear warmup over the first tenth of `steps`, then cosine decay to 0."""
    warmup = steps // 10
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (step + 1) / warmup
        if step < warmup
        else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup))),
    )


def supervised_fine_tune(model, examples: list[tuple[list[int], int]], pad_id: int) -> None:
    """Next-token loss on reply tokens; AdamW with warmup and cosine decay."""
    rng = random.Random(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=SFT_LR, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, SFT_STEPS)
    model.train()
    order: list[int] = []
    for step in range(1, SFT_STEPS + 1):
        if len(order) < SFT_BATCH:
            order += rng.sample(range(len(examples)), len(examples))
        batch, order = [examples[i] for i in order[:SFT_BATCH]], order[SFT_BATCH:]
        input_ids, labels = sft_batch(batch, pad_id)
        logits = model(input_ids=input_ids, attention_mask=(input_ids != pad_id).long()).logits  # [B, T, V]
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == 1:
            print(f"sft step {step:4d}/{SFT_STEPS}  loss {loss.item():.4f}", flush=True)


@torch.no_grad()
def greedy_reply(model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    messages = [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="train pairs from make_demo_data.py")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="model directory to write")
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(SEED)

    pairs = read_pairs(args.data)
    tokenizer = build_tokenizer([text for pair in pairs for text in pair.values()])
    model = build_model(tokenizer)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocabulary {len(tokenizer)}")
    supervised_fine_tune(model, sft_examples(tokenizer, pairs), tokenizer.pad_token_id)

    model.eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    for prompt in ("what is 3 plus 4?", "what colour is the sky?", "tell me about the cat.", "hello!"):
        print(f"{prompt!r} -> {greedy_reply(model, tokenizer, prompt)!r}")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
