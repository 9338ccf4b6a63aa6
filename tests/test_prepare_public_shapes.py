"""`dpokit prepare` on the layouts and schemas of public preference sets (made-up rows, the real columns and file
names), each checked by decoding the stored ids against the chat template's rendering of the expected messages."""

from __future__ import annotations

import gzip
import json
import math

import numpy as np
import pytest
from transformers import AutoTokenizer

from dpokit.cli import main
from dpokit.data.prepared import load_prepared

UF_SPLITS = {"train_prefs": 12, "test_prefs": 5, "train_sft": 7, "test_sft": 3, "train_gen": 4, "test_gen": 2}


def prepare(data, model, out, *flags):
    return main(["prepare", str(data), "--model", str(model), "--out", str(out), *map(str, flags)])


def rendered(tokenizer, prompt, reply=None):
    """The template's text of the prompt (with the generation prompt), or of what `reply` adds after it."""
    head = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    if reply is None:
        return head
    return tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": reply}], tokenize=False)[
        len(head) :
    ]


def decoded_rows(out, tokenizer, split="train"):
    data = load_prepared(out).split(split)
    return [
        {
            part: tokenizer.decode(row[f"{part}_ids"], skip_special_tokens=False)
            for part in ("prompt", "chosen", "rejected")
        }
        for row in data
    ]


def ultrafeedback_row(split, index):
    prompt = f"{split} question {index}: what is {index} plus 2?"
    return {
        "prompt": prompt,
        "prompt_id": f"id{index}",
        "chosen": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"{index + 2}."}],
        "rejected": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"{index + 3}."}],
        "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": f"{index + 2}."}],
        "score_chosen": 8.0 + index / 4,
        "score_rejected": 3.5 if index % 3 else None,
    }


@pytest.fixture
def ultrafeedback_folder(tmp_path):
    """HuggingFaceH4/ultrafeedback_binarized's layout: data/{split}-00000-of-00001.parquet, six splits."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "h4_uf" / "data"
    folder.mkdir(parents=True)
    for split, rows in UF_SPLITS.items():
        table = pa.Table.from_pylist([ultrafeedback_row(split, i) for i in range(rows)])
        pq.write_table(table, folder / f"{split}-00000-of-00001.parquet")
    return folder


def test_a_folder_named_by_split_reads_the_asked_splits_with_their_scores(
    ultrafeedback_folder, tokenizer_dir, tmp_path
):
    out = tmp_path / "prepared"
    flags = ("--split", "train_prefs", "--eval-split", "test_prefs", "--eval-data", ultrafeedback_folder)
    assert prepare(ultrafeedback_folder, tokenizer_dir, out, *flags) == 0
    prepared = load_prepared(out)
    assert {name: len(prepared.split(name)) for name in ("train", "eval")} == {"train": 12, "eval": 5}
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for split, source in (("train", "train_prefs"), ("eval", "test_prefs")):
        expected = [ultrafeedback_row(source, i) for i in range(UF_SPLITS[source])]
        for row, source_row in zip(decoded_rows(out, tokenizer, split), expected):
            prompt = [{"role": "user", "content": source_row["prompt"]}]
            assert row == {
                "prompt": rendered(tokenizer, prompt),
                "chosen": rendered(tokenizer, prompt, source_row["chosen"][1]["content"]),
                "rejected": rendered(tokenizer, prompt, source_row["rejected"][1]["content"]),
            }
        data = prepared.split(split)
        np.testing.assert_array_equal(data["chosen_score"], [np.float32(r["score_chosen"]) for r in expected])
        rejected = [math.nan if r["score_rejected"] is None else r["score_rejected"] for r in expected]
        np.testing.assert_array_equal(data["rejected_score"], np.asarray(rejected, dtype=np.float32))
        scored = sum(r["score_rejected"] is not None for r in expected)
        assert prepared.manifest["splits"][split]["scores"] == {"present": scored}
        assert prepared.manifest["splits"][split]["unused_columns"] == {
            "messages": len(expected),
            "prompt_id": len(expected),
        }


def test_eval_split_alone_reads_the_same_folder_and_slices_as_datasets_writes_them(
    ultrafeedback_folder, tokenizer_dir, tmp_path
):
    out = tmp_path / "prepared"
    assert (
        prepare(
            ultrafeedback_folder, tokenizer_dir, out, "--split", "train_prefs[:5]", "--eval-split", "test_prefs[40%:]"
        )
        == 0
    )
    prepared = load_prepared(out)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompts = [row["prompt"] for row in decoded_rows(out, tokenizer)]
    assert prompts == [
        rendered(tokenizer, [{"role": "user", "content": ultrafeedback_row("train_prefs", i)["prompt"]}])
        for i in range(5)
    ]
    assert len(prepared.split("eval")) == 5 - round(0.4 * 5)  # rows 2, 3, 4


def test_a_split_that_matches_no_file_lists_the_splits_found(ultrafeedback_folder, tokenizer_dir, tmp_path, capsys):
    assert prepare(ultrafeedback_folder, tokenizer_dir, tmp_path / "p", "--split", "train_pref") == 1
    err = capsys.readouterr().err
    assert "no 'train_pref' split" in err
    assert "test_gen, test_prefs, test_sft, train_gen, train_prefs, train_sft" in err
    # without --split, the default train split is not there either: the folder is not merged whole
    assert prepare(ultrafeedback_folder, tokenizer_dir, tmp_path / "q") == 1
    assert "no 'train' split" in capsys.readouterr().err


ORCA_ROWS = [
    {
        "system": "" if i % 3 == 0 else f"You are helpful assistant number {i}.",
        "question": f"what is {i} plus 1?",
        "chosen": f"{i} plus 1 equals {i + 1}.",
        "rejected": f"{i} plus 1 equals {i + 7}.",
    }
    for i in range(30)
]


def orca_messages(row, prompt_column="question"):
    system = [{"role": "system", "content": row["system"]}] if row["system"] else []
    return system + [{"role": "user", "content": row[prompt_column]}]


def test_orca_keeps_every_rows_system_text(tokenizer_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "orca.parquet"  # Intel/orca_dpo_pairs: system, question, chosen, rejected
    pq.write_table(pa.Table.from_pylist(ORCA_ROWS), data)
    out = tmp_path / "prepared"
    assert prepare(data, tokenizer_dir, out, "--column-map", "prompt=question") == 0
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = decoded_rows(out, tokenizer)
    assert len(rows) == 30
    for row, source in zip(rows, ORCA_ROWS):
        assert row["prompt"] == rendered(tokenizer, orca_messages(source))
        assert row["chosen"] == rendered(tokenizer, orca_messages(source), source["chosen"])
    assert sum("<|system|>" in row["prompt"] for row in rows) == 20  # the 10 empty ones add no system turn
    assert load_prepared(out).manifest["counts"]["unused_columns"] == {}


def test_orca_without_a_prompt_mapping_names_the_columns_and_the_fix(tokenizer_dir, tmp_path, capsys):
    data = tmp_path / "orca.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ORCA_ROWS))
    assert prepare(data, tokenizer_dir, tmp_path / "p") == 1
    err = capsys.readouterr().err
    assert "no 'prompt' column; columns found: system, question, chosen, rejected" in err
    assert "--column-map prompt=question" in err


def test_truthy_dpo_reads_its_system_column_without_flags_and_system_prompt_fills_empty_ones(tokenizer_dir, tmp_path):
    rows = [dict(row, prompt=row.pop("question")) for row in (dict(r) for r in ORCA_ROWS)]  # system, prompt, ...
    data = tmp_path / "truthy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prepared"
    assert prepare(data, tokenizer_dir, out, "--system-prompt", "Be brief.") == 0
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for row, source in zip(decoded_rows(out, tokenizer), rows):
        system = source["system"] or "Be brief."
        expected = [{"role": "system", "content": system}, {"role": "user", "content": source["prompt"]}]
        assert row["prompt"] == rendered(tokenizer, expected)


def hh_text(*turns):
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {text}" for i, text in enumerate(turns))


@pytest.fixture
def hh_folder(tmp_path):
    """Anthropic/hh-rlhf's layout: {helpful-base,harmless-base}/{train,test}.jsonl.gz, HH text; every third
    row's conversations differ at the first answer and go on (diverge before the last turn)."""
    folder = tmp_path / "hh-rlhf"
    for subset in ("harmless-base", "helpful-base"):
        (folder / subset).mkdir(parents=True)
        for split, count in (("train", 9), ("test", 4)):
            rows = []
            for i in range(count):
                question = f"{subset} {split} what is {i} plus 1?"
                if i % 3 == 2:
                    chosen = hh_text("hi", "hello!", question, f"{i + 1}.")
                    rejected = hh_text("hi", "go away", question, f"{i + 5}.")
                else:
                    chosen, rejected = (
                        hh_text("hi", "hello!", question, f"{i + 1}."),
                        hh_text("hi", "hello!", question, "no."),
                    )
                rows.append({"chosen": chosen, "rejected": rejected})
            with gzip.open(folder / subset / f"{split}.jsonl.gz", "wt", encoding="utf-8") as stream:
                stream.write("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_hh_rlhf_compressed_folder_reads_train_and_test_and_counts_early_divergence(hh_folder, tokenizer_dir, tmp_path):
    out = tmp_path / "prepared"
    assert prepare(hh_folder, tokenizer_dir, out, "--eval-split", "test") == 0
    prepared = load_prepared(out)
    splits = prepared.manifest["splits"]
    assert (splits["train"]["read"], splits["train"]["kept"]) == (18, 12)
    assert splits["train"]["dropped"] == {"diverges_before_last_turn": 6}
    assert (splits["eval"]["read"], splits["eval"]["kept"]) == (8, 6)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    question = "harmless-base train what is 0 plus 1?"
    prompt = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": question},
    ]
    first = decoded_rows(out, tokenizer)[0]
    assert first == {
        "prompt": rendered(tokenizer, prompt),
        "chosen": rendered(tokenizer, prompt, "1."),
        "rejected": rendered(tokenizer, prompt, "no."),
    }
    assert all("<|user|>" not in row["chosen"] + row["rejected"] for row in decoded_rows(out, tokenizer))


@pytest.mark.parametrize(
    "name", ["pairs.jsonl.gz", "pairs.json.gz", "pairs.csv.gz", "pairs.jsonl.bz2", "pairs.jsonl.xz"]
)
def test_a_compressed_file_is_read_as_its_inner_format(tokenizer_dir, tmp_path, name):
    import bz2
    import csv
    import io
    import lzma

    rows = [{"prompt": f"what is {i} plus 1?", "chosen": f"{i + 1}.", "rejected": "no."} for i in range(6)]
    if ".csv" in name:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(rows)
        content = text.getvalue()
    elif ".jsonl" in name:
        content = "".join(json.dumps(r) + "\n" for r in rows)
    else:
        content = json.dumps(rows)
    opener = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}[name.rsplit(".", 1)[1]]
    with opener(tmp_path / name, "wt", encoding="utf-8") as stream:
        stream.write(content)
    out = tmp_path / "prepared"
    assert prepare(tmp_path / name, tokenizer_dir, out) == 0
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert [row["prompt"] for row in decoded_rows(out, tokenizer)] == [
        rendered(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in rows
    ]


def test_ranked_data_read_as_pairs_gets_the_ranked_hint_not_a_chosen_mapping(tokenizer_dir, tmp_path, capsys):
    rows = [{"prompt": "q", "responses": ["a", "b", "c", "d"], "rewards": [1.0, 0.5, 0.2, 0.1]}] * 3
    data = tmp_path / "k4.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert prepare(data, tokenizer_dir, tmp_path / "p") == 1
    err = capsys.readouterr().err
    assert "--format ranked --column-map completions=responses,scores=rewards" in err
    assert "chosen=<column>" not in err


def test_an_unused_column_is_counted_in_manifest_and_summary(tokenizer_dir, tmp_path, capsys):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b", "notes": "keep me"} for i in range(4)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "prepared"
    assert prepare(data, tokenizer_dir, out) == 0
    assert load_prepared(out).manifest["counts"]["unused_columns"] == {"notes": 4}
    assert "column not read: notes" in capsys.readouterr().out


def test_data_without_scores_is_stored_as_before(pairs_jsonl, tokenizer_dir, tmp_path):
    out = tmp_path / "prepared"
    assert prepare(pairs_jsonl, tokenizer_dir, out) == 0
    prepared = load_prepared(out)
    assert prepared.split("train").column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    assert "scores" not in prepared.manifest and not prepared.has_scores


def test_a_dataset_name_takes_its_eval_split_from_itself(tokenizer_dir, tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, subset, split):
        calls.append((name, subset, split))
        return datasets.Dataset.from_list([ultrafeedback_row(split, i) for i in range(3)])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    out = tmp_path / "prepared"
    assert prepare("org/uf", tokenizer_dir, out, "--split", "train_prefs[:3]", "--eval-split", "test_prefs") == 0
    assert calls == [("org/uf", None, "train_prefs[:3]"), ("org/uf", None, "test_prefs")]
    assert load_prepared(out).manifest["splits"]["eval"]["source"] == "org/uf [test_prefs]"
