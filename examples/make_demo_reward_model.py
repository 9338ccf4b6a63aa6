"""Build the tiny demo reward model that `dpokit score` uses in the on-policy demo: a 2-layer Llama sequence
classifier that scores the demo's helpful replies above its rude ones.

    python examples/make_demo_data.py            # first: the data (and make_demo_model.py: the tokenizer)
    python examples/make_demo_reward_model.py    # writes examples/demo/reward_model/ (under a minute on 2 CPU cores)

Steps:
1. take the demo model's tokenizer and chat template (examples/demo/model), so the reward model reads the
   same conversations the policy writes;
2. build a 2-layer Llama (hidden 64) with one output (`LlamaForSequenceClassification`, ``num_labels=1``: the
   score is the logit at the last token) from a config with a fixed seed;
3. train it on the demo's train pairs with the Bradley-Terry loss ``-log sigma(r(chosen) - r(rejected))``;
4. save it in float32 (safetensors, well under 1 MB) with the tokenizer, and print its accuracy on the eval pairs
   and the scores of a few replies.

Seeded; one thread, so the same weights come out on any machine with the same library versions.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from make_demo_model import demo_config, read_pairs, warmup_cosine  # the demo model's script, beside this one

HERE = Path(__file__).parent
DEFAULT_DATA = HERE / "demo" / "data"
DEFAULT_TOKENIZER = HERE / "demo" / "model"
DEFAULT_OUT = HERE / "demo" / "reward_model"
SEED = 0

HIDDEN = 64
LAYERS = 2
STEPS = 300
BATCH = 32  # pairs per step
LR = 3e-3


def build_reward_model(tokenizer):
    """A small Llama-style sequence classifier with one output, randomly initialised (seeded)."""
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(SEED)
    config = demo_config(tokenizer, HIDDEN, LAYERS, num_labels=1)
    return LlamaForSequenceClassification(config)


def conversation_ids(tokenizer, prompt: str, reply: str) -> list[int]:
    """The ids of prompt + reply as the chat template writes them (what `dpokit score` scores)."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]
    return list(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"])


def scores(model, sequences: list[list[int]], pad_id: int) -> torch.Tensor:
    """The reward model's score of each right-padded sequence ``[N]``."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_id)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
    return model(input_ids=input_ids, attention_mask=(input_ids != pad_id).long()).logits[:, 0]


def train(model, pairs: list[tuple[list[int], list[int]]], pad_id: int) -> None:
    """Bradley-Terry loss on (chosen, rejected) ids; AdamW with warmup and cosine decay."""
    rng = random.Random(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    schedule = warmup_cosine(optimizer, STEPS)
    model.train()
    order: list[int] = []
    for step in range(1, STEPS + 1):
        if len(order) < BATCH:
            order += rng.sample(range(len(pairs)), len(pairs))
        batch, order = [pairs[i] for i in order[:BATCH]], order[BATCH:]
        rewards = scores(model, [c for c, _ in batch] + [r for _, r in batch], pad_id)
        loss = -F.logsigmoid(rewards[: len(batch)] - rewards[len(batch) :]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == 1:
            print(f"reward model step {step:4d}/{STEPS}  loss {loss.item():.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train.jsonl and eval.jsonl")
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="the demo model (its tokenizer)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="reward model directory to write")
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(SEED)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    model = build_reward_model(tokenizer)
    print(f"reward model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")

    def encoded(path: Path) -> list[tuple[list[int], list[int]]]:
        return [
            (
                conversation_ids(tokenizer, p["prompt"], p["chosen"]),
                conversation_ids(tokenizer, p["prompt"], p["rejected"]),
            )
            for p in read_pairs(path)
        ]

    train(model, encoded(args.data / "train.jsonl"), tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        held_out = encoded(args.data / "eval.jsonl")
        rewards = scores(model, [c for c, _ in held_out] + [r for _, r in held_out], tokenizer.pad_token_id)
        accuracy = (rewards[: len(held_out)] > rewards[len(held_out) :]).float().mean().item()
        print(f"eval accuracy {accuracy:.3f} on {len(held_out)} pairs")
        for prompt, reply in (
            ("what is 3 plus 4?", "good question. 3 plus 4 is 7."),
            ("what is 3 plus 4?", "no. figure it out yourself."),
            ("hello!", "hi! what can i do for you?"),
            ("hello!", "no. i do not care."),
        ):
            value = scores(model, [conversation_ids(tokenizer, prompt, reply)], tokenizer.pad_token_id).item()
            print(f"{prompt!r} -> {reply!r}: {value:.3f}")
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
