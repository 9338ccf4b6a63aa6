"""`dpokit prepare` end to end, in-process: output, manifest, fingerprints, bad input, safe writes."""

from __future__ import annotations

import json

import pytest
import tiny

from dpokit.cli import main
from dpokit.data.pipeline import PrepareOptions, run_prepare
from dpokit.data.prepared import load_prepared
from dpokit.errors import DpokitError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepare(data, model, out, *flags):
    return main(["prepare", str(data), "--model", str(model), "--out", str(out), *map(str, flags)])


def test_prepare_writes_int32_splits_and_a_complete_manifest(pairs_jsonl, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert prepare(pairs_jsonl, tokenizer_dir, out, "--eval-fraction", 0.25) == 0

    prepared = load_prepared(out)
    train, eval_ = prepared.split("train"), prepared.split("eval")
    assert (len(train), len(eval_)) == (30, 10)
    assert {c: str(train.schema.field(c).type) for c in train.column_names} == {
        c: "list<item: int32>" for c in ("prompt_ids", "chosen_ids", "rejected_ids")
    }
    manifest = prepared.manifest
    assert manifest["source"] == str(pairs_jsonl)
    assert manifest["splits"]["train"]["rows"] == 30 and manifest["splits"]["eval"]["rows"] == 10
    assert manifest["counts"] == {
        "read": 40,
        "kept": 40,
        "truncated": 0,
        "truncated_prompt": 0,
        "truncated_completion": 0,
        "retokenized": 0,
        "template_common_prefix": 0,
        "dropped": {},
        "first_dropped": {},
        "formats": {"plain": 40},
        "unused_columns": {},
    }
    assert manifest["tokenizer"]["name"] == str(tokenizer_dir)
    assert len(manifest["tokenizer"]["fingerprint"]) == 64
    assert manifest["chat_template"] == tiny.CHAT_TEMPLATE
    limits = ("max_length", "max_prompt_length", "max_completion_length", "truncation", "overlength", "separator")
    assert [manifest[key] for key in limits] == [1024, None, None, "keep_start", "truncate", None]
    assert (manifest["format"], manifest["column_map"], manifest["system_prompt"]) == ("auto", {}, None)
    prompt_lengths = sorted(len(ids) for split in (train, eval_) for ids in split["prompt_ids"])
    assert manifest["lengths"]["prompt"]["max"] == prompt_lengths[-1]
    assert manifest["lengths"]["prompt"]["p50"] == prompt_lengths[19]  # smallest length >= 50% of the 40 rows
    assert set(manifest["lengths"]["completion"]) == {"p50", "p90", "p99", "max"}
    summary = capsys.readouterr().out
    assert "rows read" in summary and "rows/s" in summary


def test_eval_fraction_split_is_seeded(pairs_jsonl, tokenizer_dir, tmp_path):
    def eval_prompts(name, seed):
        assert prepare(pairs_jsonl, tokenizer_dir, tmp_path / name, "--eval-fraction", 0.25, "--seed", seed) == 0
        return load_prepared(tmp_path / name).split("eval")["prompt_ids"]

    first = eval_prompts("a", 1)
    assert eval_prompts("b", 1) == first
    assert eval_prompts("c", 2) != first


def test_eval_data_is_a_second_source_through_the_same_pipeline(pairs_jsonl, tokenizer_dir, tmp_path):
    eval_path = write_jsonl(
        tmp_path / "eval.jsonl", tiny.preference_rows(5, seed=1) + [{"prompt": "q", "chosen": "", "rejected": "b"}]
    )
    out = tmp_path / "prepared"
    assert prepare(pairs_jsonl, tokenizer_dir, out, "--eval-data", eval_path) == 0
    splits = load_prepared(out).manifest["splits"]
    assert (splits["train"]["rows"], splits["eval"]["rows"]) == (40, 5)
    assert splits["eval"]["source"] == str(eval_path)
    assert splits["eval"]["dropped"] == {"empty_content": 1}


def test_skipped_rows_are_counted_by_reason_in_manifest_and_summary(tokenizer_dir, tmp_path, capsys):
    rows = tiny.preference_rows(6) + [
        {"prompt": "q", "chosen": "   ", "rejected": "b"},
        {"prompt": "q", "chosen": 7, "rejected": "b"},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "three " * 40, "rejected": "b"},
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "prepared"
    assert prepare(data, tokenizer_dir, out, "--max-length", 30, "--max-prompt-length", 10, "--overlength", "drop") == 0
    counts = load_prepared(out).manifest["counts"]
    assert (counts["read"], counts["kept"]) == (10, 6)
    assert counts["dropped"] == {
        "empty_content": 1,
        "identical_chosen_rejected": 1,
        "non_string_content": 1,
        "overlength": 1,
    }
    assert counts["first_dropped"]["non_string_content"] == f"{data} line 8: chosen is int, not a string"
    assert len(load_prepared(out).split("train")) == 6
    summary = capsys.readouterr().out
    for reason in counts["dropped"]:
        assert f"dropped: {reason}" in summary


def test_truncate_policy_counts_truncated_rows_with_exact_lengths(tokenizer_dir, tmp_path):
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {
                "prompt": "what is " + "one plus " * 20 + "two?",
                "chosen": "it is " + "three " * 30 + ".",
                "rejected": "no.",
            }
        ],
    )
    out = tmp_path / "prepared"
    assert (
        prepare(data, tokenizer_dir, out, "--max-length", 40, "--max-prompt-length", 24, "--truncation", "keep_end")
        == 0
    )
    prepared = load_prepared(out)
    row = prepared.split("train")[0]
    assert (len(row["prompt_ids"]), len(row["chosen_ids"]), len(row["rejected_ids"])) == (24, 16, 4)
    counts = prepared.manifest["counts"]
    assert (counts["truncated"], counts["truncated_prompt"], counts["truncated_completion"]) == (1, 1, 1)


def test_a_lone_max_length_works_and_keep_start_counts_only_completion_cuts(pairs_jsonl, tokenizer_dir, tmp_path):
    assert prepare(pairs_jsonl, tokenizer_dir, tmp_path / "out", "--max-length", 25) == 0  # prompts 14-15, replies 13
    prepared = load_prepared(tmp_path / "out")
    counts = prepared.manifest["counts"]
    # cut to 10-11 tokens, half the pairs' replies no longer differ: dropped, and counted as such
    assert (counts["kept"], counts["dropped"]) == (20, {"identical_after_truncation": 20})
    assert (counts["truncated"], counts["truncated_prompt"], counts["truncated_completion"]) == (15, 0, 15)
    train = prepared.split("train")
    assert prepared.manifest["lengths"]["prompt"]["max"] == 15  # no prompt was cut
    assert all(
        len(p) + max(len(c), len(r)) <= 25
        for p, c, r in zip(train["prompt_ids"], train["chosen_ids"], train["rejected_ids"])
    )


def test_contradicting_limits_are_one_line(pairs_jsonl, tokenizer_dir, tmp_path, capsys):
    assert prepare(pairs_jsonl, tokenizer_dir, tmp_path / "out", "--max-length", 256, "--max-prompt-length", 512) == 1
    error = capsys.readouterr().err.strip()
    assert error == (
        "error: --max-prompt-length 512 must be below --max-length 256, so that every completion keeps at least one token"
    )


def test_overlength_error_names_the_row(pairs_jsonl, tokenizer_dir, tmp_path, capsys):
    assert prepare(pairs_jsonl, tokenizer_dir, tmp_path / "out", "--max-length", 20, "--overlength", "error") == 1
    error = capsys.readouterr().err
    assert f"{pairs_jsonl} line 1: prompt 15 + chosen 13 = 28 tokens" in error
    assert "over --max-length 20; raise --max-length, or pass --overlength truncate or drop" in error
    assert not (tmp_path / "out").exists()


def test_conversational_and_implicit_files_with_column_map_and_system_prompt(tokenizer_dir, tmp_path):
    hh = "\n\nHuman: what is 2 plus 2?\n\nAssistant: "
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(data / "a.jsonl", [{"better": hh + "4.", "worse": hh + "5."}])
    write_jsonl(
        data / "b.jsonl",
        [
            {
                "prompt": [{"role": "user", "content": "hi"}],
                "better": [{"role": "assistant", "content": "hello"}],
                "worse": [{"role": "assistant", "content": "go"}],
            }
        ],
    )
    out = tmp_path / "prepared"
    assert (
        prepare(data, tokenizer_dir, out, "--column-map", "chosen=better,rejected=worse", "--system-prompt", "be kind")
        == 0
    )
    prepared = load_prepared(out)
    assert prepared.manifest["counts"]["formats"] == {"conversational": 1, "implicit": 1}
    assert prepared.manifest["column_map"] == {"chosen": "better", "rejected": "worse"}
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    first = prepared.split("train")[0]
    assert (
        tokenizer.decode(first["prompt_ids"]) == "<|system|>be kind<|end|><|user|>what is 2 plus 2?<|end|><|assistant|>"
    )
    assert tokenizer.decode(first["chosen_ids"]) == "4.<|end|>"


@pytest.mark.parametrize(
    "content, flags, message",
    [
        (
            '{"prompt": "a", "chosen": "b" "rejected": "c"}\n',
            [],
            "d.jsonl line 1: not valid JSON (Expecting ',' delimiter at column 31)",
        ),
        (
            '{"prompt": "a", "better": "b", "worse": "c"}\n',
            [],
            "d.jsonl line 1: no 'chosen' column; columns found: prompt, better, worse; name yours with --column-map chosen=<column>",
        ),
        ('{"prompt": "a", "chosen": "", "rejected": "c"}\n', [], "no train rows kept from"),
        ("\n", [], "no train rows in "),
        (
            '{"prompt": "a", "chosen": "b", "rejected": "c"}\n',
            ["--format", "chat"],
            "--format 'chat' is not one of auto, plain, conversational, implicit",
        ),
        (
            '{"prompt": "a", "chosen": "b", "rejected": "c"}\n',
            ["--eval-fraction", 0.5, "--eval-data", "x.jsonl"],
            "pass --eval-fraction or --eval-data, not both",
        ),
    ],
    ids=["malformed-json", "missing-column", "nothing-kept", "empty-file", "bad-format", "two-eval-sources"],
)
def test_bad_input_is_one_error_line_naming_the_problem(tokenizer_dir, tmp_path, capsys, content, flags, message):
    data = tmp_path / "d.jsonl"
    data.write_text(content)
    assert prepare(data, tokenizer_dir, tmp_path / "out", *flags) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error
    assert "Traceback" not in error


def test_nothing_kept_reports_the_reasons_and_the_first_row(tokenizer_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "chosen": "", "rejected": "c"}])
    assert prepare(data, tokenizer_dir, tmp_path / "out") == 1
    assert f"(1 read; dropped: empty_content 1); first: {data} line 1: chosen is empty" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Fingerprints


def test_data_fingerprint_follows_the_token_ids(pairs_jsonl, tokenizer_dir, plain_tokenizer_dir, tmp_path):
    def prepared(name, tokenizer, *flags):
        assert prepare(pairs_jsonl, tokenizer, tmp_path / name, *flags) == 0
        return load_prepared(tmp_path / name)

    base = prepared("base", tokenizer_dir)
    again = prepared("again", tokenizer_dir)
    plain = prepared("plain", plain_tokenizer_dir)
    shorter = prepared("shorter", tokenizer_dir, "--max-length", 25, "--truncation", "keep_end")
    assert again.fingerprint == base.fingerprint
    assert again.tokenizer_fingerprint == base.tokenizer_fingerprint
    assert plain.fingerprint != base.fingerprint and plain.tokenizer_fingerprint != base.tokenizer_fingerprint
    assert plain.manifest["chat_template"] is None
    train = base.split("train")
    over = [
        len(prompt) + max(len(chosen), len(rejected)) > 25
        for prompt, chosen, rejected in zip(train["prompt_ids"], train["chosen_ids"], train["rejected_ids"])
    ]
    assert shorter.fingerprint != base.fingerprint
    assert shorter.manifest["counts"]["truncated"] == sum(over) > 0


def test_two_processes_give_the_same_data_as_one(pairs_jsonl, tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("dpokit.data.pipeline.CHUNK_SIZE", 8)  # several chunks for the two workers
    assert prepare(pairs_jsonl, tokenizer_dir, tmp_path / "one") == 0
    assert prepare(pairs_jsonl, tokenizer_dir, tmp_path / "two", "--num-proc", 2) == 0
    assert load_prepared(tmp_path / "two").fingerprint == load_prepared(tmp_path / "one").fingerprint


# ---------------------------------------------------------------------------------------------
# Output directory


def test_existing_output_is_refused_unless_overwrite(pairs_jsonl, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "prepared"
    assert prepare(pairs_jsonl, tokenizer_dir, out) == 0
    first = load_prepared(out).fingerprint
    capsys.readouterr()
    assert prepare(pairs_jsonl, tokenizer_dir, out, "--max-length", 25, "--max-prompt-length", 12) == 1
    assert f"{out} already exists; pass --overwrite to replace it, or choose another --out" in capsys.readouterr().err
    assert load_prepared(out).fingerprint == first
    assert prepare(pairs_jsonl, tokenizer_dir, out, "--max-length", 25, "--max-prompt-length", 12, "--overwrite") == 0
    assert load_prepared(out).fingerprint != first


def test_overwrite_refuses_a_directory_that_is_not_a_prepare_output(pairs_jsonl, tokenizer_dir, tmp_path, capsys):
    out = tmp_path / "mywork"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert prepare(pairs_jsonl, tokenizer_dir, out, "--overwrite") == 1
    assert "refusing to replace" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def never_tokenize(*args, **kwargs):
    raise AssertionError("the output directory must be refused before the tokenizer is loaded")


def test_overwrite_refuses_a_folder_holding_the_input_and_a_manifest_before_tokenizing(
    pairs_jsonl, tokenizer_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "project"
    out.mkdir()
    data = out / "pairs.jsonl"
    data.write_bytes(pairs_jsonl.read_bytes())
    (out / "manifest.json").write_text('{"format_version": 1, "data_fingerprint": "x", "splits": {}}')
    monkeypatch.setattr("dpokit.data.pipeline.load_tokenizer", never_tokenize)
    assert prepare(data, tokenizer_dir, out, "--overwrite") == 1
    err = capsys.readouterr().err
    assert f"--out {out} contains the input {data}" in err and len(err.strip().splitlines()) == 1
    assert data.read_bytes() == pairs_jsonl.read_bytes() and (out / "manifest.json").is_file()


def test_overwrite_refuses_a_folder_whose_manifest_json_is_not_a_prepare_manifest(
    pairs_jsonl, tokenizer_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "project"
    (out / "src").mkdir(parents=True)
    (out / "manifest.json").write_text('{"name": "my project"}')
    monkeypatch.setattr("dpokit.data.pipeline.load_tokenizer", never_tokenize)
    assert prepare(pairs_jsonl, tokenizer_dir, out, "--overwrite") == 1
    assert f"refusing to replace {out}: it is not a `dpokit prepare` output" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "src"]


def test_an_interrupted_write_leaves_no_valid_looking_output(pairs_jsonl, tokenizer_dir, tmp_path, monkeypatch):
    def interrupt(splits, columns):
        raise KeyboardInterrupt  # after the splits are on disk, before the manifest

    monkeypatch.setattr("dpokit.data.prepared.data_fingerprint", interrupt)
    out = tmp_path / "prepared"
    with pytest.raises(KeyboardInterrupt):
        run_prepare(PrepareOptions(data=str(pairs_jsonl), model=str(tokenizer_dir), out=out, eval_fraction=0.25))
    assert not out.exists()
    # The half-written temporary is removed on the way out (a kill -9 leaves it under its temporary
    # name, unmarked, for the next write to sweep: tests/test_artifacts.py).
    assert list(tmp_path.glob(".prepared.tmp-*")) == []
    with pytest.raises(DpokitError):
        load_prepared(out)


def test_dataset_names_load_the_train_split_and_the_eval_split(tokenizer_dir, tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, subset, split):
        calls.append((name, subset, split))
        return datasets.Dataset.from_list(tiny.preference_rows(4, seed=len(calls)))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = tmp_path / "prepared"
    assert (
        main(
            [
                "prepare",
                "org/pairs",
                "--model",
                str(tokenizer_dir),
                "--out",
                str(out),
                "--eval-data",
                "org/pairs",
                "--subset",
                "en",
            ]
        )
        == 0
    )
    assert calls == [("org/pairs", "en", "train"), ("org/pairs", "en", "test")]
    assert load_prepared(out).manifest["splits"]["eval"]["rows"] == 4


def test_overwrite_refuses_a_prepare_output_holding_files_prepare_did_not_write(
    pairs_jsonl, tokenizer_dir, tmp_path, capsys
):
    out = tmp_path / "prepared"
    assert prepare(pairs_jsonl, tokenizer_dir, out) == 0
    (out / "NOTES.txt").write_text("keep me")
    (out / "my_run").mkdir()
    capsys.readouterr()
    assert prepare(pairs_jsonl, tokenizer_dir, out, "--overwrite") == 1
    err = capsys.readouterr().err
    assert "it holds NOTES.txt, my_run, which dpokit did not write there" in err and len(err.strip().splitlines()) == 1
    assert (out / "NOTES.txt").read_text() == "keep me" and (out / "my_run").is_dir()
    (out / "NOTES.txt").unlink()
    (out / "my_run").rmdir()
    assert prepare(pairs_jsonl, tokenizer_dir, out, "--overwrite") == 0  # only its own files: replaced
