"""`dpokit score` and `dpokit select`: on-policy completions scored and turned into prepared data.

A reward model's score is its own logit on the conversation its tokenizer renders; a scoring function's values pass
through, checked; an interrupted or 2-process score writes what one uninterrupted process does. RSO's acceptance
follows Algorithm 1 of Liu et al. 2023 (a hand computation, and its closed-form frequencies); each rule's rows come
from a hand-made scored folder, with everything left out counted; the output is prepared data that `ref-logps` and
`train` run on.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tiny
import torch
from conftest import run_dpokit_elsewhere, train_cli_args

from dpokit.artifacts import write_marker
from dpokit.cli import main
from dpokit.data.prepared import load_prepared
from dpokit.onpolicy.select import first_round_pairs, prompt_rng, rso_accept

PROMPTS = ["tell me about the sky?", "what is 3 plus 4?", "tell me about the cat?", "hello!", "what is the sun?"]
COMPLETIONS = [
    ["yes, the {t} is blue. thanks!", "no. you are rude.", "the {t} is small and fast", "i do not know"],
    ["3 plus 4 equals 7.", "3 plus 4 equals 9.", "seven", "no. figure it out yourself."],
]


# ---------------------------------------------------------------------------------------------
# folders as `dpokit sample` and `dpokit score` write them


def sample_records(tokenizer, prompts: list[str], completions: list[list[str]], finished=None) -> list[dict]:
    """Records of samples.jsonl: ids from the chat template, each completion's with its end-of-turn token."""
    records = []
    for index, (prompt, texts) in enumerate(zip(prompts, completions)):
        messages = [{"role": "user", "content": prompt}]
        prompt_ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
        completion_ids = []
        for text in texts:
            full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": text}])["input_ids"]
            assert list(full[: len(prompt_ids)]) == prompt_ids
            completion_ids.append(list(full[len(prompt_ids) :]))
        records.append(
            {
                "index": index,
                "prompt": messages,
                "prompt_ids": prompt_ids,
                "completions": list(texts),
                "completion_ids": completion_ids,
                "finished": list(finished[index]) if finished else [True] * len(texts),
            }
        )
    return records


def write_folder(out: Path, kind: str, records: list[dict], **manifest) -> Path:
    """A complete samples/ (or scored/) folder holding `records`, marked as dpokit's."""
    out.mkdir(parents=True)
    write_marker(out, kind)
    (out / "manifest.json").write_text(
        json.dumps(
            {
                "format_version": 1,
                "kind": kind,
                "num_prompts": len(records),
                "k": len(records[0]["completions"]),
                "complete": True,
                "tokenizer": {"name": "tests/tiny", "fingerprint": "test-tokenizer"},
                **manifest,
            }
        )
    )
    name = "samples.jsonl" if kind == "samples" else "scored.jsonl"
    (out / name).write_text("".join(json.dumps(record) + "\n" for record in records))
    return out


def demo_completions(count: int) -> tuple[list[str], list[list[str]]]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(count)]
    completions = [
        [text.format(t=p.split()[-1].rstrip("?")) for text in COMPLETIONS[i % 2]] for i, p in enumerate(prompts)
    ]
    return prompts, completions


@pytest.fixture(scope="module")
def samples_dir(tokenizer_dir, tiny_model_dir, tmp_path_factory) -> Path:
    """8 prompts, k = 4, tokenized with the tiny model's chat template; two completions did not finish."""
    from transformers import AutoTokenizer

    prompts, completions = demo_completions(8)
    finished = [[True] * 4 for _ in prompts]
    finished[1][3] = finished[5][0] = False
    records = sample_records(AutoTokenizer.from_pretrained(tokenizer_dir), prompts, completions, finished)
    out = tmp_path_factory.mktemp("samples") / "samples"
    return write_folder(out, "samples", records, model=str(tiny_model_dir), chat_template_text=tiny.CHAT_TEMPLATE,
                        separator=None)  # fmt: skip


def build_reward_model(out: Path, tokenizer_dir: Path, seed: int) -> Path:
    """A 2-layer Llama sequence classifier with one output, random weights (seeded), saved with the tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    LlamaForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def reward_model_dir(tokenizer_dir, tmp_path_factory) -> Path:
    return build_reward_model(tmp_path_factory.mktemp("reward_model"), tokenizer_dir, seed=1)


@pytest.fixture(scope="session")
def plain_reward_model_dir(plain_tokenizer_dir, tmp_path_factory) -> Path:
    return build_reward_model(tmp_path_factory.mktemp("plain_reward_model"), plain_tokenizer_dir, seed=2)


def score(samples: Path, out: Path, *extra) -> int:
    return main(["score", str(samples), "--out", str(out), *map(str, extra)])


def select(scored: Path, out: Path, *extra) -> int:
    return main(["select", str(scored), "--out", str(out), *map(str, extra)])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def scored_dir(samples_dir, reward_model_dir, tmp_path_factory) -> Path:
    """`samples_dir` scored by the tiny reward model, uninterrupted, batches of 3."""
    out = tmp_path_factory.mktemp("scored") / "scored"
    assert score(samples_dir, out, "--reward-model", reward_model_dir, "--batch-size", 3) == 0
    return out


def own_logits(model_dir: Path, sequences: list[list[int]]) -> list[float]:
    """The reward model's logit on each sequence alone (no padding, no batch)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in sequences]


# ---------------------------------------------------------------------------------------------
# score


def test_reward_model_score_is_its_own_logit_on_the_templated_conversation(
    samples_dir, scored_dir, reward_model_dir, capsys
):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    records = read_jsonl(scored_dir / "scored.jsonl")
    sequences = []
    for record in records:
        for text in record["completions"]:
            conversation = record["prompt"] + [{"role": "assistant", "content": text}]
            rendered = tokenizer.apply_chat_template(conversation, tokenize=False)
            sequences.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    got = [s for record in records for s in record["scores"]]
    np.testing.assert_allclose(got, own_logits(reward_model_dir, sequences), atol=1e-5, rtol=0)
    # the records are the samples', in order, with the scores added
    assert [{k: v for k, v in r.items() if k != "scores"} for r in records] == read_jsonl(samples_dir / "samples.jsonl")
    manifest = json.loads((scored_dir / "manifest.json").read_text())
    assert manifest["complete"] and manifest["scorer"] == "reward_model" and manifest["kind"] == "scored"
    assert manifest["reward_model"] == str(reward_model_dir.resolve()) and manifest["dtype"] == "float32"
    assert manifest["samples"] == str(samples_dir.resolve()) and len(manifest["samples_fingerprint"]) == 64
    assert manifest["counts"] == {
        "prompts": 8,
        "completions": 32,
        "unfinished": 2,
        "scored_by_last_run": 32,
        "batch_files": 11,
    }
    assert manifest["scores"] == pytest.approx(
        {"mean": np.mean(got), "std": np.std(got), "min": min(got), "max": max(got)}
    )
    assert manifest["tokenizer"] == {"name": "tests/tiny", "fingerprint": "test-tokenizer"}


def test_a_reward_model_without_a_chat_template_scores_prepares_plain_ids(
    samples_dir, plain_reward_model_dir, tmp_path
):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(plain_reward_model_dir)
    assert score(samples_dir, tmp_path / "scored", "--reward-model", plain_reward_model_dir) == 0
    records = read_jsonl(tmp_path / "scored" / "scored.jsonl")
    # prepare's plain rule: the prompt's text and a blank line (with special tokens), the completion, EOS
    sequences = [
        tokenizer(record["prompt"][0]["content"] + "\n\n")["input_ids"]
        + tokenizer(text, add_special_tokens=False)["input_ids"]
        + [tokenizer.eos_token_id]
        for record in records
        for text in record["completions"]
    ]
    got = [s for record in records for s in record["scores"]]
    np.testing.assert_allclose(got, own_logits(plain_reward_model_dir, sequences), atol=1e-5, rtol=0)


def test_a_scoring_function_gives_its_own_values(samples_dir, tmp_path):
    assert score(samples_dir, tmp_path / "scored", "--scorer", "scorers:completion_length", "--batch-size", 5) == 0
    records = read_jsonl(tmp_path / "scored" / "scored.jsonl")
    assert [r["scores"] for r in records] == [[float(len(c)) for c in r["completions"]] for r in records]
    manifest = json.loads((tmp_path / "scored" / "manifest.json").read_text())
    assert manifest["scorer"] == "function" and manifest["function"] == "scorers:completion_length"


@pytest.mark.parametrize(
    "function, message",
    [
        ("one_score_short", "--scorer scorers:one_score_short returned 4 scores for 5 completions"),
        ("nan_for_the_second", "--scorer scorers:nan_for_the_second returned nan for prompt 0 completion 1"),
        ("no_such_function", "--scorer 'scorers:no_such_function': module 'scorers' has no attribute"),
    ],
)
def test_a_broken_scoring_function_is_refused_naming_it(samples_dir, tmp_path, capsys, function, message):
    assert score(samples_dir, tmp_path / "scored", "--scorer", f"scorers:{function}", "--batch-size", 5) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "scored" / "scored.jsonl").exists()


def test_a_model_that_is_not_a_one_output_reward_model_is_refused(samples_dir, tiny_model_dir, tmp_path, capsys):
    assert score(samples_dir, tmp_path / "scored", "--reward-model", tiny_model_dir) == 1
    assert f"reward model {tiny_model_dir} has num_labels=2" in capsys.readouterr().err
    assert not (tmp_path / "scored").exists()


def test_an_interrupted_score_resumes_to_the_same_scored_jsonl(
    samples_dir, scored_dir, reward_model_dir, tmp_path, monkeypatch
):
    from dpokit.onpolicy import score as score_module

    write_batch, written = score_module.write_batch, []

    def crash_after_two(out, index, scores):
        if len(written) == 2:
            raise RuntimeError("simulated crash after 2 batches")
        written.append(index)
        write_batch(out, index, scores)

    out = tmp_path / "scored"
    monkeypatch.setattr(score_module, "write_batch", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        score(samples_dir, out, "--reward-model", reward_model_dir, "--batch-size", 3)
    assert len(list((out / "batches").glob("batch-*.json"))) == 2 and not (out / "scored.jsonl").exists()
    monkeypatch.setattr(score_module, "write_batch", write_batch)
    assert score(samples_dir, out, "--reward-model", reward_model_dir, "--batch-size", 3) == 0
    assert (out / "scored.jsonl").read_text() == (scored_dir / "scored.jsonl").read_text()
    assert json.loads((out / "manifest.json").read_text())["counts"]["scored_by_last_run"] == 32 - 6


def test_a_lost_batch_is_scored_again_and_nothing_else(samples_dir, scored_dir, reward_model_dir, tmp_path):
    import shutil

    out = tmp_path / "scored"
    shutil.copytree(scored_dir, out)
    lost = sorted((out / "batches").glob("batch-*.json"))[4]
    lost_count = len(json.loads(lost.read_text())["index"])
    lost.unlink()
    (out / "scored.jsonl").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    assert score(samples_dir, out, "--reward-model", reward_model_dir, "--batch-size", 3) == 0
    assert (out / "scored.jsonl").read_text() == (scored_dir / "scored.jsonl").read_text()
    assert json.loads((out / "manifest.json").read_text())["counts"]["scored_by_last_run"] == lost_count


def test_a_folder_scored_otherwise_is_refused_naming_what_differs_unless_overwrite(
    samples_dir, scored_dir, tmp_path, capsys
):
    import shutil

    out = tmp_path / "scored"
    shutil.copytree(scored_dir, out)
    assert score(samples_dir, out, "--scorer", "scorers:completion_length") == 1
    err = capsys.readouterr().err
    assert f"{out} was scored from other inputs: scorer differs: reward_model there, function now" in err
    assert "Pass --overwrite to replace it" in err
    assert score(samples_dir, out, "--scorer", "scorers:completion_length", "--overwrite") == 0
    records = read_jsonl(out / "scored.jsonl")
    assert records[0]["scores"] == [float(len(c)) for c in records[0]["completions"]]


def test_overwrite_refuses_a_folder_dpokit_did_not_write(samples_dir, scored_dir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert score(samples_dir, out, "--scorer", "scorers:completion_length", "--overwrite") == 1
    assert f"refusing to replace {out}: it is not a `dpokit score` output" in capsys.readouterr().err
    assert select(scored_dir, out, "--overwrite") == 1
    assert f"refusing to replace {out}: it is not a `dpokit prepare` output" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_the_scoring_function_example_in_the_docs_scores(samples_dir, tmp_path, monkeypatch):
    from test_docs import documented_modules

    code = documented_modules("on-policy.md").get("my_rules.py")
    if code is None:
        pytest.skip("docs/on-policy.md has no my_rules.py example yet")
    (tmp_path / "my_rules.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert score(samples_dir, tmp_path / "scored", "--scorer", "my_rules:score") == 0
    records = read_jsonl(tmp_path / "scored" / "scored.jsonl")
    assert records[1]["scores"][0] == pytest.approx(1 - len("3 plus 4 equals 7.") / 1000)


@pytest.mark.slow
def test_two_processes_score_as_one(samples_dir, reward_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # both runs compute with one thread a process
    args = ["--reward-model", str(reward_model_dir), "--batch-size", "3"]
    run_dpokit_elsewhere(["score", str(samples_dir), "--out", str(tmp_path / "one"), *args])
    run_dpokit_elsewhere(["score", str(samples_dir), "--out", str(tmp_path / "two"), *args, "--gpus", "2"])
    assert (tmp_path / "two" / "scored.jsonl").read_text() == (tmp_path / "one" / "scored.jsonl").read_text()


# ---------------------------------------------------------------------------------------------
# RSO's acceptance


def test_rso_acceptance_follows_algorithm_1_on_given_uniforms():
    uniforms = iter([0.5, 0.9, 0.1, 0.3, 0.2])
    # round 1, max reward 2: c0 0.5 >= e^-1 no; c1 0.9 >= e^-2 no; c2 0.1 < 1 yes; c3 0.3 >= e^-1.5 no
    # round 2 over c0, c1, c3, max reward 1: c0 0.2 < 1 yes, and 2 are accepted: stop
    accepted, draws = rso_accept([1.0, 0.0, 2.0, 0.5], 2, 1.0, lambda: next(uniforms))
    assert accepted == [2, 0] and draws == 5 and next(uniforms, None) is None
    uniforms = iter([0.6, 0.05, 0.99])  # beta 0.5: c0 0.6 >= e^-2 no; c1 0.05 < e^-1 yes; c2 accepted
    assert rso_accept([0.0, 0.5, 1.0], 2, 0.5, lambda: next(uniforms)) == ([1, 2], 3)


def test_first_round_ranking_pairs_in_acceptance_order_and_leaves_out_ties():
    rewards = [0.0, 3.0, 1.0, 1.0, 2.0, 5.0]
    assert first_round_pairs([0, 1, 2, 3, 5, 4, 2], rewards) == ([(1, 0), (5, 4)], [1])


def test_rso_acceptance_frequencies_match_the_closed_form():
    # num_samples 1, beta 1, rewards [0, 0.5, 1]: one round, c0 accepted with e^-1, else c1 with e^-0.5, else c2
    counts = Counter(rso_accept([0.0, 0.5, 1.0], 1, 1.0, prompt_rng(7, n).random)[0][0] for n in range(20_000))
    p0 = math.exp(-1)
    p1 = (1 - p0) * math.exp(-0.5)
    for candidate, expected in enumerate([p0, p1, 1 - p0 - p1]):
        assert abs(counts[candidate] / 20_000 - expected) < 0.01, (candidate, counts)


# ---------------------------------------------------------------------------------------------
# select


def hand_scored(out: Path) -> Path:
    """Six prompts with made-up ids and scores: a plain one, an all-tied one, one with an unfinished best, one whose
    best and worst have the same ids, one with a tie among the accepted, and one more plain one."""

    def ids(j: int) -> list[int]:
        return [10 + j, 5]

    rows = [
        ([1.0, 3.0, 0.0, 3.0], None, None),
        ([2.0, 2.0, 2.0, 2.0], None, None),
        ([0.0, 1.0, 5.0, 1.0], [True, True, False, True], None),
        ([4.0, 0.0, 1.0, 2.0], None, {1: ids(0)}),  # the worst's ids are the best's
        ([1.0, 1.0, 1.0, 0.0], None, None),
        ([0.5, -1.0, 2.5, 1.5], None, None),
    ]
    records = []
    for index, (scores, finished, same) in enumerate(rows):
        records.append(
            {
                "index": index,
                "prompt": [{"role": "user", "content": f"prompt {index}"}],
                "prompt_ids": [1, 2, index],
                "completions": [f"completion {j}" for j in range(4)],
                "completion_ids": [(same or {}).get(j, ids(j)) for j in range(4)],
                "finished": finished or [True] * 4,
                "scores": scores,
            }
        )
    return write_folder(out, "scored", records, samples="/samples", scorer="function", function="scorers:x")


def split_rows(prepared: Path, split: str = "train") -> list[dict]:
    return list(load_prepared(prepared).split(split))


def test_best_worst_pairs_the_first_best_with_the_first_worst_and_counts_what_it_drops(tmp_path):
    scored = hand_scored(tmp_path / "scored")
    assert select(scored, tmp_path / "prepared", "--drop-unfinished") == 0
    rows = split_rows(tmp_path / "prepared")
    # prompt 0: 3.0 first at 1, 0.0 at 2; prompt 2 without its unfinished 5.0: 1.0 first at 1, 0.0 at 0;
    # prompt 4: 1.0 first at 0, 0.0 at 3; prompt 5: 2.5 at 2, -1.0 at 1
    expected = [(0, 1, 2), (2, 1, 0), (4, 0, 3), (5, 2, 1)]
    assert [(r["prompt_ids"][2], r["chosen_ids"][0] - 10, r["rejected_ids"][0] - 10) for r in rows] == expected
    manifest = load_prepared(tmp_path / "prepared").manifest
    counts = manifest["counts"]
    assert counts["read"] == 6 and counts["kept"] == 4
    assert counts["dropped"] == {"all_completions_tie": 1, "identical_chosen_rejected": 1}
    assert counts["first_dropped"]["identical_chosen_rejected"] == "prompt 3: completions 0 and 1 have the same ids"
    assert counts["completions_dropped"] == {"unfinished": 1}
    assert manifest["shape"] == "pairs" and manifest["tokenizer"]["fingerprint"] == "test-tokenizer"
    assert manifest["source"] == {
        "scored": str(scored.resolve()),
        "rule": "best_worst",
        "seed": 42,
        "eval_fraction": 0.0,
        "drop_unfinished": True,
        "samples": "/samples",
        "scorer": "function",
        "function": "scorers:x",
    }


def test_best_random_rejects_a_seeded_draw_among_the_strictly_lower(tmp_path):
    scored = hand_scored(tmp_path / "scored")
    rejected = Counter()
    for seed in range(12):
        out = tmp_path / f"prepared-{seed}"
        assert select(scored, out, "--rule", "best_random", "--seed", seed) == 0
        row = split_rows(out)[0]  # prompt 0: best at 1 (3.0); strictly lower: 0 (1.0) and 2 (0.0), never 3 (3.0)
        lower = [0, 2]
        assert row["chosen_ids"][0] - 10 == 1
        assert row["rejected_ids"][0] - 10 == lower[prompt_rng(seed, 0).integers(2)]
        rejected[row["rejected_ids"][0] - 10] += 1
    assert set(rejected) == {0, 2}


def test_all_writes_each_prompts_completions_and_scores_as_a_ranked_group(tmp_path):
    scored = hand_scored(tmp_path / "scored")
    assert select(scored, tmp_path / "prepared", "--rule", "all", "--drop-unfinished") == 0
    rows = split_rows(tmp_path / "prepared")
    assert [r["prompt_ids"][2] for r in rows] == [0, 2, 3, 4, 5]
    assert [[ids[0] - 10 for ids in r["completion_ids"]] for r in rows][1] == [0, 1, 3]
    assert rows[1]["scores"] == [0.0, 1.0, 1.0] and rows[4]["scores"] == [0.5, -1.0, 2.5, 1.5]
    manifest = load_prepared(tmp_path / "prepared").manifest
    assert manifest["shape"] == "ranked" and manifest["k"]["counts"] == {"3": 1, "4": 4}
    assert manifest["counts"]["completions_dropped"] == {"unfinished": 1}


def test_rso_pairs_its_accepted_samples_in_order_and_counts_ties_and_draws(tmp_path):
    scored = hand_scored(tmp_path / "scored")
    assert select(scored, tmp_path / "prepared", "--rule", "rso", "--rso-beta", 1.0, "--seed", 3) == 0
    expected, draws, accepted, tied = [], 0, 0, 0
    for record in read_jsonl(scored / "scored.jsonl"):
        scores = record["scores"]
        if len(set(scores)) == 1:
            continue
        chosen, n = rso_accept(scores, 4, 1.0, prompt_rng(3, record["index"]).random)
        draws, accepted = draws + n, accepted + len(chosen)
        pairs, ties = first_round_pairs(chosen, scores)
        tied += len(ties)
        ids = record["completion_ids"]
        expected += [(record["index"], ids[c], ids[r]) for c, r in pairs if ids[c] != ids[r]]
    rows = split_rows(tmp_path / "prepared")
    assert [(r["prompt_ids"][2], r["chosen_ids"], r["rejected_ids"]) for r in rows] == expected
    counts = load_prepared(tmp_path / "prepared").manifest["counts"]
    assert counts["rso"] == {"draws": draws, "accepted": accepted, "acceptance_rate": round(accepted / draws, 6)}
    assert accepted == 5 * 4 and counts["pairs_dropped"].get("tied_pair", 0) == tied
    assert counts["dropped"]["all_completions_tie"] == 1


def test_rso_samples_must_pair_up(tmp_path, capsys):
    assert select(hand_scored(tmp_path / "scored"), tmp_path / "prepared", "--rule", "rso", "--rso-samples", 3) == 1
    assert "--rso-samples 3 must be an even number of at least 2" in capsys.readouterr().err


def test_selected_pairs_run_through_ref_logps_and_train(samples_dir, scored_dir, tiny_model_dir, tmp_path):
    prepared = tmp_path / "prepared"
    assert select(scored_dir, prepared, "--eval-fraction", 0.25, "--seed", 1) == 0
    data = load_prepared(prepared)
    assert data.splits == ["train", "eval"] and data.manifest["counts"]["read"] == 8
    # how the prompts were rendered, as prepare records it: `train` renders its own eval prompts alike
    assert data.manifest["chat_template"] == tiny.CHAT_TEMPLATE and data.manifest["separator"] is None
    samples = read_jsonl(samples_dir / "samples.jsonl")
    scored = read_jsonl(scored_dir / "scored.jsonl")
    eval_prompts = set()
    for split in data.splits:
        for row in data.split(split):
            # the ids are the samples' own: the prompt's, and the best- and worst-scored completions'
            record = next(
                r for r in samples if r["prompt_ids"] == row["prompt_ids"] and row["chosen_ids"] in r["completion_ids"]
            )
            scores = scored[record["index"]]["scores"]
            assert row["chosen_ids"] == record["completion_ids"][int(np.argmax(scores))]
            assert row["rejected_ids"] == record["completion_ids"][int(np.argmin(scores))]
            if split == "eval":
                eval_prompts.add(record["index"])
    assert len(eval_prompts) == 2
    cache = tmp_path / "ref.h5"
    assert main(["ref-logps", str(prepared), "--model", str(tiny_model_dir), "--out", str(cache)]) == 0
    run = tmp_path / "run"
    args = train_cli_args(tiny_model_dir, prepared, run, "--max-steps", 1, "reference.source=cache",
                          f"reference.cache={cache}")  # fmt: skip
    assert main(args) == 0
    assert (run / "metrics.jsonl").is_file()
