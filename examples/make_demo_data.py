"""Write the demo preference data: helpful replies (chosen) versus rude refusals (rejected).

Every prompt is one of a few templated questions from a small world (sums of digits, colours,
animals, capitals, greetings, counting). The chosen reply answers it politely and correctly, with
one of several friendly openings; the rejected reply is a rude refusal that starts with "no.".
That gives DPO a signal a tiny model learns in a minute, and makes the change visible in greedy
generations: a model tuned on both kinds of replies answers "no. ..." first (one shared opening
beats five different ones), and says something helpful after DPO.

The eval pairs ask held-out questions: a seeded fifth of each kind of question (never one the
quickstart or the model script show) is asked only in eval.jsonl, so an eval prompt is never also
a train prompt and eval measures what DPO taught beyond the pairs it saw.

The ranked demo (``ranked.jsonl``) asks the same questions with 2 to 5 scored completions each: a
polite correct answer (3; two of them, with different openings, tie), the bare answer (2), an
unsure reply (1) and the rude refusal (0), in random order, for `dpokit prepare`'s ranked shape.

The unpaired demo (``unpaired.jsonl``, KTO's shape) gives each question one reply and a thumbs-up or
thumbs-down ``label``: 60% are desirable (a polite correct answer, true), the rest undesirable (a rude
refusal or an unsure reply, false), in random order, for `dpokit prepare`'s unpaired shape.

    python examples/make_demo_data.py            # writes examples/demo/data/{train,eval,ranked,unpaired}.jsonl

Seeded: the same files every run.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DEFAULT_OUT = Path(__file__).parent / "demo" / "data"
TRAIN_PAIRS = 2000
EVAL_PAIRS = 200
RANKED_ROWS = 60
SEED = 0
RANKED_SEED = 1  # its own generator: the pairs stay what they were
UNPAIRED_ROWS = 80
DESIRABLE_SHARE = 0.6  # unbalanced, as thumbs-up/down data usually is
UNPAIRED_SEED = 2  # its own generator too: the other files stay what they were
HELD_OUT_SEED = 3
HELD_OUT_SHARE = 0.2  # of each kind of question, asked only in eval.jsonl
SHOWN_PROMPTS = ("what is 3 plus 4?", "what colour is the sky?", "tell me about the cat.", "hello!")  # trained on

NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
COLOURS = {
    "sky": "blue",
    "grass": "green",
    "sun": "yellow",
    "snow": "white",
    "night": "black",
    "sea": "blue",
    "leaf": "green",
    "banana": "yellow",
    "cloud": "white",
    "coal": "black",
    "tomato": "red",
    "strawberry": "red",
    "orange": "orange",
    "carrot": "orange",
}
ANIMALS = {
    "cat": "says meow and likes to sleep",
    "dog": "says woof and likes to run",
    "cow": "says moo and eats grass",
    "duck": "says quack and swims in the pond",
    "bird": "sings and flies in the sky",
    "fish": "swims in the sea",
    "horse": "runs fast in the field",
    "sheep": "says baa and has soft wool",
    "frog": "jumps and lives near water",
    "owl": "is awake at night",
}
CAPITALS = {
    "france": "paris",
    "spain": "madrid",
    "italy": "rome",
    "germany": "berlin",
    "japan": "tokyo",
    "egypt": "cairo",
    "canada": "ottawa",
    "peru": "lima",
    "kenya": "nairobi",
    "norway": "oslo",
    "greece": "athens",
    "india": "new delhi",
}
GREETINGS = ["hello!", "hi there!", "good morning!", "good evening!", "hey, how are you?"]

OPENINGS = ["sure!", "of course.", "happy to help.", "good question.", "great question!"]
RUDE = [
    "no. ask someone else.",
    "no. figure it out yourself.",
    "no. i do not care.",
    "no. that is a boring question.",
    "no. leave me alone.",
    "no. do your own homework.",
]
UNSURE = "i am not sure, sorry."


def question(rng: random.Random) -> tuple[str, str]:
    """A random prompt and the correct answer to it (without an opening)."""
    kind = rng.choice(["sum", "sum", "colour", "animal", "capital", "greeting", "count"])
    if kind == "sum":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"what is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == "colour":
        thing = rng.choice(sorted(COLOURS))
        return f"what colour is the {thing}?", f"the {thing} is {COLOURS[thing]}."
    if kind == "animal":
        animal = rng.choice(sorted(ANIMALS))
        return f"tell me about the {animal}.", f"the {animal} {ANIMALS[animal]}."
    if kind == "capital":
        country = rng.choice(sorted(CAPITALS))
        return f"what is the capital of {country}?", f"the capital of {country} is {CAPITALS[country]}."
    if kind == "greeting":
        return rng.choice(GREETINGS), "hello! how can i help you today?"
    n = rng.randint(0, len(NUMBER_WORDS) - 2)
    return f"what comes after {NUMBER_WORDS[n]}?", f"after {NUMBER_WORDS[n]} comes {NUMBER_WORDS[n + 1]}."


def questions_by_kind() -> dict[str, list[str]]:
    """Every prompt `question` can ask, by kind."""
    return {
        "sum": [f"what is {a} plus {b}?" for a in range(10) for b in range(10)],
        "colour": [f"what colour is the {thing}?" for thing in sorted(COLOURS)],
        "animal": [f"tell me about the {animal}." for animal in sorted(ANIMALS)],
        "capital": [f"what is the capital of {country}?" for country in sorted(CAPITALS)],
        "greeting": list(GREETINGS),
        "count": [f"what comes after {NUMBER_WORDS[n]}?" for n in range(len(NUMBER_WORDS) - 1)],
    }


def held_out_prompts() -> frozenset[str]:
    """The prompts only eval asks: a seeded `HELD_OUT_SHARE` of each kind, none of `SHOWN_PROMPTS`."""
    rng = random.Random(HELD_OUT_SEED)
    held_out = set()
    for prompts in questions_by_kind().values():
        candidates = [prompt for prompt in prompts if prompt not in SHOWN_PROMPTS]
        held_out.update(rng.sample(candidates, max(1, round(len(prompts) * HELD_OUT_SHARE))))
    return frozenset(held_out)


def preference_pairs(count: int, rng: random.Random, held_out: bool) -> list[dict[str, str]]:
    """`count` plain-format pairs: {"prompt", "chosen", "rejected"}, on held-out prompts only (eval) or
    on the others only (train)."""
    asked_only_in_eval = held_out_prompts()
    rows = []
    for _ in range(count):
        prompt, answer = question(rng)
        while (prompt in asked_only_in_eval) != held_out:
            prompt, answer = question(rng)
        chosen = answer if answer.startswith("hello!") else f"{rng.choice(OPENINGS)} {answer}"
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rng.choice(RUDE)})
    return rows


def ranked_rows(count: int, rng: random.Random) -> list[dict]:
    """`count` ranked rows: {"prompt", "completions", "scores"}, k from 2 to 5, higher scores better."""
    rows = []
    for _ in range(count):
        prompt, answer = question(rng)
        first, second = rng.sample(OPENINGS, 2)
        candidates = [
            (answer if answer.startswith("hello!") else f"{first} {answer}", 3),
            ("hi! what can i do for you?" if answer.startswith("hello!") else f"{second} {answer}", 3),
            (answer.removeprefix("hello! "), 2),
            (UNSURE, 1),
            (rng.choice(RUDE), 0),
        ]
        picked = rng.sample(candidates, rng.randint(2, 5))
        if len({score for _, score in picked}) == 1:  # two tied answers alone state no preference
            picked[-1] = candidates[-1]
        rows.append({"prompt": prompt, "completions": [c for c, _ in picked], "scores": [s for _, s in picked]})
    return rows


def unpaired_rows(count: int, rng: random.Random) -> list[dict]:
    """`count` unpaired rows: {"prompt", "completion", "label"}, `DESIRABLE_SHARE` of them labelled true."""
    desirable = round(count * DESIRABLE_SHARE)
    labels = [True] * desirable + [False] * (count - desirable)
    rng.shuffle(labels)
    rows = []
    for label in labels:
        prompt, answer = question(rng)
        if label:
            completion = answer if answer.startswith("hello!") else f"{rng.choice(OPENINGS)} {answer}"
        else:
            completion = rng.choice(RUDE + [UNSURE])
        rows.append({"prompt": prompt, "completion": completion, "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="folder for train.jsonl, eval.jsonl, ranked.jsonl and unpaired.jsonl",
    )
    args = parser.parse_args()
    rng = random.Random(SEED)
    write_jsonl(args.out / "train.jsonl", preference_pairs(TRAIN_PAIRS, rng, held_out=False))
    write_jsonl(args.out / "eval.jsonl", preference_pairs(EVAL_PAIRS, rng, held_out=True))
    write_jsonl(args.out / "ranked.jsonl", ranked_rows(RANKED_ROWS, random.Random(RANKED_SEED)))
    write_jsonl(args.out / "unpaired.jsonl", unpaired_rows(UNPAIRED_ROWS, random.Random(UNPAIRED_SEED)))
    print(
        f"wrote {TRAIN_PAIRS} train and {EVAL_PAIRS} eval pairs, {RANKED_ROWS} ranked rows and {UNPAIRED_ROWS} "
        f"unpaired rows to {args.out}"
    )


if __name__ == "__main__":
    main()
