"""`dpokit sample`: k completions per prompt, prompts made as `prepare` makes them, seeded, resumable, sharded."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny
from conftest import run_dpokit_elsewhere

from dpokit.cli import main
from dpokit.data.prepared import load_prepared
from dpokit.data.tokenize import load_tokenizer
from dpokit.errors import DpokitError
from dpokit.onpolicy import sample as sampling
from dpokit.onpolicy.sample import load_samples, read_prompts

# A stop token among every ten: the tiny random model then finishes most completions within 16 tokens, and not all.
STOP_IDS = [1, *range(100, 140)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def sample(prompts, model, out, *flags) -> int:
    return main(["sample", str(prompts), "--model", str(model), "--out", str(out), *map(str, flags)])


@pytest.fixture(scope="module")
def stopping_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model with `STOP_IDS` as its generation config's end-of-sequence tokens (as chat models list
    several): its samples end at a stop token early, or run to --max-new-tokens."""
    out = tmp_path_factory.mktemp("stopping_model") / "model"
    shutil.copytree(tiny_model_dir, out)
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": STOP_IDS, "pad_token_id": 0}))
    return out


@pytest.fixture(scope="module")
def prompts_txt(tmp_path_factory) -> Path:
    """Seven arithmetic prompts of different lengths (batches of 2: four batches, the last one short)."""
    prompts = [row["prompt"] for row in tiny.preference_rows(6)] + ["hi"]
    return write_lines(tmp_path_factory.mktemp("prompts") / "prompts.txt", prompts)


@pytest.fixture(scope="module")
def reference_samples(stopping_model_dir, prompts_txt, tmp_path_factory) -> Path:
    """An uninterrupted run on one process: what every other way of sampling the same must reproduce."""
    out = tmp_path_factory.mktemp("reference_samples") / "samples"
    assert sample(prompts_txt, stopping_model_dir, out, *RUN_FLAGS) == 0
    return out


RUN_FLAGS = ("--k", 3, "--max-new-tokens", 16, "--batch-size", 2, "--seed", 7)


# ----------------------------------------------------------------------------------------------
# what a samples folder holds


def test_samples_are_k_completions_per_prompt_cut_at_the_first_stop_token(
    reference_samples, stopping_model_dir, prompts_txt
):
    manifest, records = load_samples(reference_samples)
    records = list(records)
    tokenizer = load_tokenizer(str(stopping_model_dir))
    assert [record["index"] for record in records] == list(range(7))
    assert [record["prompt"] for record in records] == [
        [{"role": "user", "content": line}] for line in prompts_txt.read_text().splitlines()
    ]
    stops = set(STOP_IDS)
    finished = unfinished = 0
    for record in records:
        assert len(record["completions"]) == len(record["completion_ids"]) == len(record["finished"]) == 3
        for text, ids, done in zip(record["completions"], record["completion_ids"], record["finished"]):
            assert text == tokenizer.decode(ids, skip_special_tokens=True)
            first_stop = next((i for i, token in enumerate(ids) if token in stops), None)
            if done:  # ends at its first stop token, which it keeps
                assert first_stop == len(ids) - 1
                finished += 1
            else:  # ran to --max-new-tokens without one
                assert first_stop is None and len(ids) == 16
                unfinished += 1
    assert finished and unfinished, "the fixture should give both kinds"
    assert manifest["complete"] is True
    assert manifest["counts"] == {"prompts": 7, "completions": 21, "unfinished": unfinished, "skipped_prompts": {}}
    assert (manifest["k"], manifest["seed"], manifest["batch_size"], manifest["num_batches"]) == (3, 7, 2, 4)
    assert manifest["model"] == str(stopping_model_dir.resolve())
    assert (manifest["chat_template"], manifest["chat_template_text"], manifest["separator"]) == (
        None, tiny.CHAT_TEMPLATE, None
    )  # fmt: skip
    assert sorted(p.name for p in (reference_samples / "batches").iterdir()) == [
        f"batch_00000{b}.jsonl" for b in range(4)
    ]


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_prompt_ids_are_those_prepare_makes(template, tokenizer_dir, plain_tokenizer_dir, tmp_path):
    tokenizer_path = tokenizer_dir if template == "chat" else plain_tokenizer_dir
    pairs = write_jsonl(tmp_path / "pairs.jsonl", tiny.preference_rows(12))
    assert main(["prepare", str(pairs), "--model", str(tokenizer_path), "--out", str(tmp_path / "prepared")]) == 0
    prepared = load_prepared(tmp_path / "prepared").split("train")

    prompts = read_prompts(str(pairs), load_tokenizer(str(tokenizer_path)))

    assert prompts.ids == [list(ids) for ids in prepared["prompt_ids"]]
    assert prompts.messages[0] == [{"role": "user", "content": tiny.preference_rows(1)[0]["prompt"]}]


def test_sampled_prompt_ids_are_prepares_for_the_model(tiny_model_dir, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", tiny.preference_rows(3))
    assert main(["prepare", str(pairs), "--model", str(tiny_model_dir), "--out", str(tmp_path / "prepared")]) == 0
    assert sample(pairs, tiny_model_dir, tmp_path / "samples", "--k", 2, "--max-new-tokens", 4) == 0

    _, records = load_samples(tmp_path / "samples")
    prepared = load_prepared(tmp_path / "prepared").split("train")
    assert [record["prompt_ids"] for record in records] == [list(ids) for ids in prepared["prompt_ids"]]


# ----------------------------------------------------------------------------------------------
# where prompts come from


def test_prompts_come_from_text_lines_prompt_columns_and_preference_rows(tokenizer_dir, tmp_path):
    tokenizer = load_tokenizer(str(tokenizer_dir))
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    sources = {
        "lines.txt": ("what is one?\n\nwhat is two?\n", [user("what is one?"), user("what is two?")]),
        "prompts.jsonl": ([{"prompt": "what is one?"}, {"prompt": turns + user("and two?")}],
                          [user("what is one?"), turns + user("and two?")]),
        "pairs.jsonl": ([{"prompt": "what is one?", "chosen": "1", "rejected": "2"}], [user("what is one?")]),
        "implicit.jsonl": ([{"chosen": turns + user("more") + [{"role": "assistant", "content": "a"}],
                             "rejected": turns + user("more") + [{"role": "assistant", "content": "b"}]}],
                           [turns + user("more")]),
        "ranked.jsonl": ([{"prompt": "what is one?", "completions": ["1", "2"], "scores": [1, 0]}],
                         [user("what is one?")]),
        "unpaired.jsonl": ([{"prompt": "what is one?", "completion": "1", "label": True}], [user("what is one?")]),
    }  # fmt: skip
    for name, (content, expected) in sources.items():
        path = tmp_path / name
        if name.endswith(".txt"):
            path.write_text(content)
        else:
            write_jsonl(path, content)
        prompts = read_prompts(str(path), tokenizer)
        assert prompts.messages == expected, name
        assert prompts.ids == [
            list(tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=True)["input_ids"])
            for m in expected
        ], name
    assert dict(read_prompts(str(tmp_path / "lines.txt"), tokenizer).skipped) == {"empty_content": 1}


def test_unusable_prompts_are_skipped_and_counted_by_reason(tokenizer_dir, tmp_path):
    rows = [
        {"question": "what is one?"},
        {"question": ""},
        {"question": "what is one?"},
        {"question": "what is " + "one plus one and " * 20},
        {"question": 7},
    ]
    path = write_jsonl(tmp_path / "prompts.jsonl", rows)

    prompts = read_prompts(
        str(path), load_tokenizer(str(tokenizer_dir)), column_map="prompt=question", system_prompt="be brief",
        max_prompt_length=40,
    )  # fmt: skip

    assert prompts.messages == [
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is one?"}]
    ]
    assert dict(prompts.skipped) == {"empty_content": 1, "duplicate": 1, "prompt_too_long": 1, "non_string_content": 1}
    assert prompts.first_skipped["duplicate"].startswith(f"{path} line 3")


def test_a_prompt_the_chat_template_refuses_is_skipped_as_prepare_skips_it(tokenizer_dir, tmp_path):
    no_system = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system turns') }}{% endif %}"
    tokenizer = load_tokenizer(str(tokenizer_dir), no_system + tiny.CHAT_TEMPLATE)
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two?"}]
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "what is one?"}, {"prompt": system}])

    prompts = read_prompts(str(path), tokenizer)

    assert prompts.messages == [[{"role": "user", "content": "what is one?"}]]
    assert dict(prompts.skipped) == {"template_error": 1}
    assert prompts.first_skipped["template_error"] == f"{path} line 2: no system turns"


def test_a_prompts_file_without_the_prompt_column_names_the_row_and_the_fix(tokenizer_dir, tmp_path):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"question": "what is one?"}])
    with pytest.raises(DpokitError, match=r"prompts.jsonl line 1: no 'prompt' column.*--column-map prompt="):
        read_prompts(str(path), load_tokenizer(str(tokenizer_dir)))


# ----------------------------------------------------------------------------------------------
# determinism


def test_the_same_seed_gives_the_same_samples_and_another_seed_others(
    reference_samples, stopping_model_dir, prompts_txt, tmp_path
):
    assert sample(prompts_txt, stopping_model_dir, tmp_path / "again", *RUN_FLAGS) == 0
    assert sample(prompts_txt, stopping_model_dir, tmp_path / "seed8", *RUN_FLAGS[:-1], 8) == 0

    reference = (reference_samples / "samples.jsonl").read_bytes()
    assert (tmp_path / "again" / "samples.jsonl").read_bytes() == reference
    assert (tmp_path / "seed8" / "samples.jsonl").read_bytes() != reference


def test_batch_seeds_depend_on_the_seed_and_the_batch_only():
    seeds = {sampling.batch_seed(seed, batch) for seed in range(3) for batch in range(100)}
    assert len(seeds) == 300
    assert sampling.batch_seed(7, 3) == sampling.batch_seed(7, 3)


def test_temperature_zero_is_greedy_decoding(stopping_model_dir, prompts_txt, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    assert sample(prompts_txt, stopping_model_dir, tmp_path / "greedy", "--temperature", 0, "--k", 2,
                  "--max-new-tokens", 12, "--batch-size", 4) == 0  # fmt: skip

    _, records = load_samples(tmp_path / "greedy")
    model = AutoModelForCausalLM.from_pretrained(stopping_model_dir, dtype=torch.float32).eval()
    for record in records:  # each prompt alone, one token at a time through the full forward
        ids, reply = list(record["prompt_ids"]), []
        with torch.no_grad():
            while len(reply) < 12 and (not reply or reply[-1] not in STOP_IDS):
                reply.append(int(model(torch.tensor([ids + reply])).logits[0, -1].argmax()))
        assert record["completion_ids"] == [reply, reply], record["index"]
        assert record["finished"] == [reply[-1] in STOP_IDS] * 2


# ----------------------------------------------------------------------------------------------
# resuming, refusing, overwriting


def test_an_interrupted_run_resumes_to_the_same_samples(
    reference_samples, stopping_model_dir, prompts_txt, tmp_path, monkeypatch
):
    out = tmp_path / "samples"
    write_batch, written = sampling.write_batch, []

    def crash_after_two(folder, batch, records):
        if len(written) == 2:
            raise RuntimeError("simulated crash")
        written.append(batch)
        return write_batch(folder, batch, records)

    monkeypatch.setattr(sampling, "write_batch", crash_after_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sampling.run_sample(sampling.SampleOptions(str(prompts_txt), str(stopping_model_dir), str(out), k=3,
                                                   max_new_tokens=16, batch_size=2, seed=7))  # fmt: skip
    monkeypatch.setattr(sampling, "write_batch", write_batch)
    with pytest.raises(DpokitError, match=r"is not complete \(2 of 4 batches sampled\): run the same dpokit sample"):
        load_samples(out)

    generate, calls = sampling.generate_completions, []
    monkeypatch.setattr(sampling, "generate_completions", lambda *a, **kw: calls.append(1) or generate(*a, **kw))
    assert sample(prompts_txt, stopping_model_dir, out, *RUN_FLAGS) == 0

    assert len(calls) == 2  # only the two missing batches
    assert (out / "samples.jsonl").read_bytes() == (reference_samples / "samples.jsonl").read_bytes()
    assert json.loads((out / "manifest.json").read_text())["counts"] == load_samples(reference_samples)[0]["counts"]


def test_a_complete_folder_is_left_as_it_is(reference_samples, stopping_model_dir, prompts_txt, capsys):
    before = (reference_samples / "samples.jsonl").stat().st_mtime_ns
    assert sample(prompts_txt, stopping_model_dir, reference_samples, *RUN_FLAGS) == 0
    assert "is complete: 7 prompts x 3 completions; nothing to do" in capsys.readouterr().out
    assert (reference_samples / "samples.jsonl").stat().st_mtime_ns == before


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--k", 4), ("--seed", 8), ("--temperature", 0.5), ("--top-p", 0.9), ("--max-new-tokens", 8),
     ("--batch-size", 3), ("--system-prompt", "be brief")],
)  # fmt: skip
def test_another_setting_on_an_existing_folder_is_refused_naming_it(
    flag, value, reference_samples, stopping_model_dir, prompts_txt, capsys
):
    flags = dict(zip(RUN_FLAGS[::2], RUN_FLAGS[1::2])) | {flag: value}
    assert sample(prompts_txt, stopping_model_dir, reference_samples, *(x for kv in flags.items() for x in kv)) == 1
    error = capsys.readouterr().err
    assert f"was sampled with other settings: {flag} differs" in error and "--overwrite" in error


def test_other_prompts_or_model_on_an_existing_folder_are_refused(
    reference_samples, stopping_model_dir, tiny_model_dir, prompts_txt, tmp_path, capsys
):
    other = write_lines(tmp_path / "other.txt", ["what is one?"])
    assert sample(other, stopping_model_dir, reference_samples, *RUN_FLAGS) == 1
    assert "PROMPTS differs" in capsys.readouterr().err
    assert sample(prompts_txt, tiny_model_dir, reference_samples, *RUN_FLAGS) == 1
    assert "--model differs" in capsys.readouterr().err


def test_overwrite_starts_a_samples_folder_over_and_refuses_any_other_folder(
    stopping_model_dir, prompts_txt, tmp_path, capsys
):
    out = tmp_path / "samples"
    assert sample(prompts_txt, stopping_model_dir, out, *RUN_FLAGS) == 0
    assert sample(prompts_txt, stopping_model_dir, out, *RUN_FLAGS[:-1], 8, "--overwrite") == 0
    assert load_samples(out)[0]["seed"] == 8

    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    assert sample(prompts_txt, stopping_model_dir, foreign, *RUN_FLAGS, "--overwrite") == 1
    assert "refusing to replace" in capsys.readouterr().err
    assert (foreign / "mine.txt").read_text() == "keep me" and not (foreign / "manifest.json").exists()


def test_load_samples_refuses_a_folder_sample_did_not_write(tmp_path):
    with pytest.raises(DpokitError, match=r"is not a `dpokit sample` output \(no \.dpokit-artifact\.json marker\)"):
        load_samples(tmp_path)


# ----------------------------------------------------------------------------------------------
# several processes, and kill -9


@pytest.mark.slow
def test_two_processes_write_the_same_samples_as_one(reference_samples, stopping_model_dir, prompts_txt, tmp_path):
    out = tmp_path / "samples"
    run_dpokit_elsewhere(
        ["sample", str(prompts_txt), "--model", str(stopping_model_dir), "--out", str(out), *map(str, RUN_FLAGS),
         "--gpus", "2"]
    )  # fmt: skip
    assert (out / "samples.jsonl").read_bytes() == (reference_samples / "samples.jsonl").read_bytes()
    assert not (out / sampling.LOCK_NAME).exists()


@pytest.mark.slow
def test_kill_9_mid_run_leaves_a_folder_that_resumes_to_the_same_samples(stopping_model_dir, tmp_path):
    prompts = write_lines(tmp_path / "prompts.txt", [row["prompt"] for row in tiny.preference_rows(40)])
    flags = ["--k", "4", "--max-new-tokens", "24", "--batch-size", "1"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    argv = ["sample", str(prompts), "--model", str(stopping_model_dir), "--out", str(killed), *flags]
    process = subprocess.Popen(
        [sys.executable, "-m", "dpokit", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(list((killed / "batches").glob("batch_*.jsonl"))) < 3:
        assert process.poll() is None, process.stderr.read()[-2000:]
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.communicate()
    assert not (killed / "samples.jsonl").exists(), "the run finished before the kill: give it more to do"

    assert main(argv) == 0
    assert sample(prompts, stopping_model_dir, whole, *flags) == 0
    assert (killed / "samples.jsonl").read_bytes() == (whole / "samples.jsonl").read_bytes()
    assert not [p.name for p in (killed / "batches").iterdir() if p.name.startswith(".")]
