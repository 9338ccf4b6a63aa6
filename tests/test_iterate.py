"""`dpokit iterate`: rounds of sample -> score -> select -> reference -> train -> export, resumable, and on the
bundled demo a loop that raises the reward model's score of the sampled completions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dpokit.cli import main
from dpokit.onpolicy.sample import load_samples

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo"


def write_prompts(path: Path, source: Path, count: int) -> Path:
    """The first `count` distinct prompts of a demo pairs file, one per line."""
    prompts = []
    for line in source.read_text().splitlines():
        prompt = json.loads(line)["prompt"]
        if prompt not in prompts:
            prompts.append(prompt)
    path.write_text("\n".join(prompts[:count]) + "\n")
    return path


def tiny_iterate(tiny_model_dir: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    """One round on the tiny model with a rule-based scorer (tests/scorers.py), a couple of train steps."""
    return [
        "iterate",
        str(prompts),
        "--model",
        str(tiny_model_dir),
        "--scorer",
        "scorers:completion_length",
        "--config",
        "tiny_lora",
        "--rounds",
        "1",
        "--k",
        "2",
        "--max-new-tokens",
        "6",
        "--out",
        str(out),
        *extra,
        "training.max_steps=2",
        "data.batch_size=2",
        "eval.samples=0",
    ]


def test_one_round_writes_every_stage_and_a_second_run_keeps_them(tiny_model_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.txt", DEMO / "data" / "eval.jsonl", 8)
    out = tmp_path / "iter"
    assert main(tiny_iterate(tiny_model_dir, prompts, out)) == 0
    round_1 = out / "round_1"
    for name in ("samples", "scored", "prepared", "ref.h5", "run", "policy"):
        assert (round_1 / name).exists(), name
    final = out / "round_2" / "samples"
    manifest, records = load_samples(final)  # the final policy's samples: from round 1's exported policy
    assert manifest["model"] == str(round_1 / "policy") and len(list(records)) == 8
    state = json.loads((out / "iterate.json").read_text())
    assert [r["round"] for r in state["rounds"]] == [1] and state["final"]["round"] == 2
    assert state["rounds"][0]["reward"]["mean"] > 0 and state["rounds"][0]["steps"] == 2
    # the sampler was the reference: its pass wrote the cache, no ref-logps ran
    assert json.loads((round_1 / "samples" / "manifest.json").read_text())["ref_logps"] is not None
    assert "dpokit iterate" in capsys.readouterr().out

    stamps = {p: p.stat().st_mtime_ns for p in (round_1 / "samples" / "samples.jsonl", round_1 / "ref.h5")}
    assert main(tiny_iterate(tiny_model_dir, prompts, out)) == 0  # everything is there: kept, not redone
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "iterate.json").read_text())["rounds"] == state["rounds"]


def test_another_setting_on_an_existing_folder_is_refused_naming_it(tiny_model_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.txt", DEMO / "data" / "eval.jsonl", 4)
    out = tmp_path / "iter"
    assert main(tiny_iterate(tiny_model_dir, prompts, out, "--rule", "best_worst")) == 0
    capsys.readouterr()
    assert main(tiny_iterate(tiny_model_dir, prompts, out, "--rule", "best_random")) == 1
    assert "holds an iterate run with rule='best_worst', not 'best_random'" in capsys.readouterr().err


def test_iterate_refuses_what_it_sets_itself_and_two_scorers(tiny_model_dir, tmp_path, capsys):
    prompts = write_prompts(tmp_path / "prompts.txt", DEMO / "data" / "eval.jsonl", 4)
    assert main(tiny_iterate(tiny_model_dir, prompts, tmp_path / "a", "model.path=x")) == 1
    assert "dpokit iterate sets model.path for each round; remove it" in capsys.readouterr().err
    args = tiny_iterate(tiny_model_dir, prompts, tmp_path / "b", "--reward-model", str(DEMO / "reward_model"))
    assert main(args) == 1
    assert "give one of --reward-model RM or --scorer" in capsys.readouterr().err


@pytest.mark.slow
def test_two_rounds_on_the_demo_raise_the_reward_of_the_sampled_completions(tmp_path):
    """The demo policy answers helpfully or rudely about as often; the demo reward model scores helpful replies
    near +4.6 and rude ones near -4.6. Two rounds of best-vs-worst DPO must raise the mean reward of what the
    policy samples."""
    prompts = write_prompts(tmp_path / "prompts.txt", DEMO / "data" / "train.jsonl", 48)
    out = tmp_path / "iter"
    args = [
        "iterate",
        str(prompts),
        "--model",
        str(DEMO / "model"),
        "--reward-model",
        str(DEMO / "reward_model"),
        "--config",
        "demo_lora",
        "--rounds",
        "2",
        "--k",
        "4",
        "--max-new-tokens",
        "24",
        "--out",
        str(out),
        "training.max_steps=40",
        "eval.samples=0",
    ]
    assert main(args) == 0
    state = json.loads((out / "iterate.json").read_text())
    rewards = [r["reward"]["mean"] for r in state["rounds"]] + [state["final"]["reward"]["mean"]]
    assert rewards[-1] > rewards[0] + 2.0, rewards


def test_a_fixed_reference_caches_it_with_ref_logps_and_trains_from_the_previous_policy(
    tiny_model_dir, tmp_path, capsys
):
    prompts = write_prompts(tmp_path / "prompts.txt", DEMO / "data" / "eval.jsonl", 4)
    out = tmp_path / "iter"
    args = tiny_iterate(tiny_model_dir, prompts, out, "--reference", "fixed")
    args[args.index("--rounds") + 1] = "2"
    assert main(args) == 0
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    round_2 = out / "round_2"
    # round 2 samples from round 1's policy, which is not the reference: ref-logps ran with --model
    assert json.loads((round_2 / "samples" / "manifest.json").read_text())["ref_logps"] is None
    config = (round_2 / "run" / "config.yaml").read_text()
    assert f"model: {tiny_model_dir}" in config and f"path: {out / 'round_1' / 'policy'}" in config
    assert "as reference.model says" in " ".join(printed.split())  # step 0 reports instead of stopping
    state = json.loads((out / "iterate.json").read_text())
    assert [r["reference"] for r in state["rounds"]] == [str(tiny_model_dir)] * 2


def test_reference_model_needs_a_cache_and_no_adapter(train_cli, tmp_path, capsys):
    assert main(train_cli(tmp_path / "a", "reference.model=elsewhere", "reference.source=live")) == 1
    assert "reference.model needs reference.source=cache" in capsys.readouterr().err
    assert main(train_cli(tmp_path / "b", "reference.model=x", "reference.adapter=sft", "reference.source=cache")) == 1
    assert "reference.model and reference.adapter both name the reference" in capsys.readouterr().err
