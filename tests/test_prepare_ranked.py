"""`dpokit prepare` for ranked data (k scored completions per prompt): the input shapes, the score and tie rules
with every left-out completion and row counted, per-completion truncation, the prepared columns and fingerprint."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from dpokit.cli import main
from dpokit.data.formats import Record, SkippedRow, detect_shape, normalise_ranked
from dpokit.data.prepared import (
    COLUMNS,
    RANKED_COLUMNS,
    features,
    group_token_counts,
    load_prepared,
    pair_lengths,
    write_prepared,
)
from dpokit.fingerprint import data_fingerprint

REPO = Path(__file__).resolve().parents[1]


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def prepare(data, model, out, *flags) -> int:
    return main(["prepare", str(data), "--model", str(model), "--out", str(out), *map(str, flags)])


def rows_of(out: Path, split: str = "train") -> list[dict]:
    return list(load_prepared(out).split(split))


def by_hand(tokenizer, prompt: list[dict], completions: list[list[dict]]) -> dict:
    """A ranked row's ids from `apply_chat_template`, one completion at a time (the independent computation)."""
    prompt_ids = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
    completion_ids = []
    for completion in completions:
        full = list(tokenizer.apply_chat_template(prompt + completion, tokenize=True)["input_ids"])
        assert full[: len(prompt_ids)] == prompt_ids
        completion_ids.append(full[len(prompt_ids) :])
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids}


def ids_and_scores(rows: list[dict]) -> list[dict]:
    return [{key: row[key] for key in RANKED_COLUMNS} for row in rows]


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


# ---------------------------------------------------------------------------------------------
# Input shapes


def test_generic_rows_prepare_to_the_templates_ids_with_float32_scores(tokenizer_dir, chat_tokenizer, tmp_path):
    rows = [
        {"prompt": "what is 2 plus 3?", "completions": ["5.", "6.", "five."], "scores": [2, 0, 1.5]},
        {"prompt": "say hi", "completions": ["hi.", "go away."], "scores": [0.1, -3]},
    ]
    out = tmp_path / "out"
    assert prepare(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer_dir, out) == 0

    prepared = load_prepared(out)
    assert (prepared.shape, prepared.is_ranked, prepared.manifest["shape"]) == ("ranked", True, "ranked")
    expected = [
        {
            **by_hand(chat_tokenizer, [user(row["prompt"])], [[assistant(c)] for c in row["completions"]]),
            "scores": [float(np.float32(s)) for s in row["scores"]],
        }
        for row in rows
    ]
    assert ids_and_scores(rows_of(out)) == expected
    assert chat_tokenizer.decode(expected[0]["completion_ids"][2]) == "five.<|end|>"  # end of turn included
    split = prepared.split("train")
    assert {c: str(split.schema.field(c).type) for c in split.column_names} == {
        "prompt_ids": "list<item: int32>",
        "completion_ids": "list<item: list<item: int32>>",
        "scores": "list<item: float>",
    }
    assert prepared.manifest["counts"]["formats"] == {"ranked": 2}
    saved = datasets.load_from_disk(str(out / "train"))  # the layout save_to_disk writes
    assert saved.features == features("ranked") and saved[0] == rows_of(out)[0]


def test_conversational_rows_and_completion_objects_with_a_system_prompt(tokenizer_dir, chat_tokenizer, tmp_path):
    prompt = [{"role": "system", "content": "be rude"}, user("hi"), assistant("hello"), user("sum 2 and 2")]
    rows = [
        {"prompt": prompt, "completions": [[assistant("4")], [assistant("5"), user("sure?")]], "scores": [1, 0]},
        {
            "prompt": "q?",
            "completions": [
                {"text": "a", "score": 2},
                {"completion": "b", "score": 1},
                {"response": "c", "score": 0},
                {"content": "d", "score": 3},
                {"role": "assistant", "content": "e", "score": 0.5},
            ],
        },
    ]
    out = tmp_path / "out"
    assert prepare(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer_dir, out, "--system-prompt", "be kind") == 0

    kind = {"role": "system", "content": "be kind"}
    expected = [
        {
            **by_hand(chat_tokenizer, [kind, *prompt[1:]], [[assistant("4")], [assistant("5"), user("sure?")]]),
            "scores": [1.0, 0.0],
        },
        {**by_hand(chat_tokenizer, [kind, user("q?")], [[assistant(t)] for t in "abcde"]), "scores": [2, 1, 0, 3, 0.5]},
    ]
    assert ids_and_scores(rows_of(out)) == expected


ULTRAFEEDBACK = [
    {
        "source": "evol_instruct",
        "instruction": "what colour is the sky?",
        "models": ["m1", "m2", "m3"],
        "completions": [
            {"response": "blue.", "overall_score": 8.5, "fine-grained_score": 4.25, "model": "m1", "critique": "ok"},
            {"response": "green.", "overall_score": 3.0, "fine-grained_score": 4.75, "model": "m2", "critique": "no"},
            {"response": "no.", "overall_score": 1.0, "fine-grained_score": 1.0, "model": "m3", "critique": "rude"},
        ],
    }
]


def test_ultrafeedback_rows_score_by_overall_score_or_a_mapped_key(tokenizer_dir, chat_tokenizer, tmp_path):
    data = write_jsonl(tmp_path / "uf.jsonl", ULTRAFEEDBACK)
    assert prepare(data, tokenizer_dir, tmp_path / "overall") == 0
    assert prepare(data, tokenizer_dir, tmp_path / "fine", "--column-map", "score=fine-grained_score") == 0

    hand = by_hand(
        chat_tokenizer, [user("what colour is the sky?")], [[assistant(t)] for t in ("blue.", "green.", "no.")]
    )
    assert ids_and_scores(rows_of(tmp_path / "overall")) == [{**hand, "scores": [8.5, 3.0, 1.0]}]
    assert ids_and_scores(rows_of(tmp_path / "fine")) == [{**hand, "scores": [4.25, 4.75, 1.0]}]
    manifest = load_prepared(tmp_path / "fine").manifest
    assert manifest["counts"]["formats"] == {"ultrafeedback": 1}
    assert manifest["column_map"] == {"score": "fine-grained_score"}


NECTAR = [
    {
        "prompt": "\n\nHuman: what is 1 plus 1?\n\nAssistant: why?\n\nHuman: just tell me\n\nAssistant:",
        "answers": [
            {"answer": "two.", "model": "m1", "rank": 2},
            {"answer": "go away.", "model": "m2", "rank": 4},
            {"answer": "2.", "model": "m3", "rank": 1},
            {"answer": "it is 2.", "model": "m4", "rank": 2},
        ],
        "turns": 2,
        "num_responses": 4,
    }
]


def test_nectar_ranks_become_scores_with_ties_kept_and_the_hh_prompt_its_turns(tokenizer_dir, chat_tokenizer, tmp_path):
    out = tmp_path / "out"
    assert prepare(write_jsonl(tmp_path / "nectar.jsonl", NECTAR), tokenizer_dir, out) == 0

    prompt = [user("what is 1 plus 1?"), assistant("why?"), user("just tell me")]
    answers = [[assistant(a["answer"])] for a in NECTAR[0]["answers"]]
    # score = max rank - rank: rank 1 (best) scores 3, the two rank-2 answers tie at 2, rank 4 scores 0
    assert ids_and_scores(rows_of(out)) == [
        {**by_hand(chat_tokenizer, prompt, answers), "scores": [2.0, 0.0, 3.0, 2.0]}
    ]
    assert load_prepared(out).manifest["counts"]["formats"] == {"nectar": 1}


def test_parquet_csv_and_dataset_names_prepare_the_same_rows_as_jsonl(tokenizer_dir, tmp_path, monkeypatch):
    generic = [
        {"prompt": "what is 2 plus 3?", "completions": ["5.", "6.", "7."], "scores": [2, 0, 1]},
        {"prompt": "say hi", "completions": ["hi.", "no."], "scores": [1, None]},  # one completion left out
        {"prompt": "say bye", "completions": ["bye.", "no."], "scores": [1, 0]},
    ]
    rows = ULTRAFEEDBACK + NECTAR
    assert prepare(write_jsonl(tmp_path / "g.jsonl", generic), tokenizer_dir, tmp_path / "g_jsonl") == 0
    assert prepare(write_jsonl(tmp_path / "r.jsonl", rows), tokenizer_dir, tmp_path / "r_jsonl") == 0

    with open(tmp_path / "g.csv", "w", newline="") as stream:  # a CSV cell holds a list as a JSON array
        writer = csv.DictWriter(stream, fieldnames=["prompt", "completions", "scores"])
        writer.writeheader()
        writer.writerows(
            {**row, "completions": json.dumps(row["completions"]), "scores": json.dumps(row["scores"])}
            for row in generic
        )
    assert prepare(tmp_path / "g.csv", tokenizer_dir, tmp_path / "g_csv") == 0
    pq.write_table(pa.Table.from_pylist(generic), tmp_path / "g.parquet")
    assert prepare(tmp_path / "g.parquet", tokenizer_dir, tmp_path / "g_parquet") == 0
    for name in ("uf", "nectar"):  # lists of structs
        pq.write_table(pa.Table.from_pylist(ULTRAFEEDBACK if name == "uf" else NECTAR), tmp_path / f"{name}.parquet")
    assert prepare(tmp_path / "uf.parquet", tokenizer_dir, tmp_path / "uf_parquet") == 0
    assert prepare(tmp_path / "nectar.parquet", tokenizer_dir, tmp_path / "nectar_parquet") == 0
    shapes = {"train": ULTRAFEEDBACK, "test": NECTAR}  # lists of structs too
    monkeypatch.setattr(datasets, "load_dataset", lambda name, subset, split: datasets.Dataset.from_list(shapes[split]))
    assert prepare("org/ranked", tokenizer_dir, tmp_path / "hub", "--eval-data", "org/ranked") == 0

    expected = rows_of(tmp_path / "g_jsonl")
    assert [len(row["completion_ids"]) for row in expected] == [3, 2]
    assert rows_of(tmp_path / "g_csv") == rows_of(tmp_path / "g_parquet") == expected
    assert rows_of(tmp_path / "uf_parquet") + rows_of(tmp_path / "nectar_parquet") == rows_of(tmp_path / "r_jsonl")
    assert rows_of(tmp_path / "hub") + rows_of(tmp_path / "hub", "eval") == rows_of(tmp_path / "r_jsonl")
    assert load_prepared(tmp_path / "g_csv").manifest["counts"]["completions_dropped"] == {"missing_score": 1}


def test_without_a_chat_template_each_completion_is_its_text_plus_eos(plain_tokenizer_dir, tmp_path):
    rows = [{"prompt": "question?", "completions": ["yes.", "no.", "maybe."], "scores": [2, 0, 1]}]
    out = tmp_path / "out"
    assert prepare(write_jsonl(tmp_path / "d.jsonl", rows), plain_tokenizer_dir, out) == 0

    tokenizer = AutoTokenizer.from_pretrained(plain_tokenizer_dir)
    (row,) = rows_of(out)
    assert row["prompt_ids"] == tokenizer("question?\n\n")["input_ids"]
    assert row["completion_ids"] == [
        tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for text in rows[0]["completions"]
    ]


def test_ranked_shape_is_detected_from_the_columns_or_named_by_format(tokenizer_dir, pairs_jsonl, tmp_path, capsys):
    assert detect_shape({"prompt": "q", "completions": [], "scores": []}, {}) == "ranked"
    assert detect_shape({"prompt": "q", "answers": []}, {}) == "ranked"
    assert detect_shape({"prompt": "q", "chosen": "a", "rejected": "b"}, {}) == "pairs"
    assert detect_shape({"q": "q", "outs": [], "marks": []}, {"completions": "outs", "scores": "marks"}) == "ranked"
    assert detect_shape({"prompt": "q", "better": "a", "completions": "x"}, {"chosen": "better"}) == "pairs"

    assert prepare(pairs_jsonl, tokenizer_dir, tmp_path / "out", "--format", "ranked") == 1
    err = capsys.readouterr().err
    assert f"{pairs_jsonl} line 1: no 'completions' column; columns found: prompt, chosen, rejected" in err
    ranked = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "q", "completions": ["a", "b"], "scores": [1, 0]}])
    assert prepare(ranked, tokenizer_dir, tmp_path / "out", "--column-map", "chosen=better") == 1  # read as pairs
    assert f"{ranked} line 1: column 'better' (mapped to chosen by --column-map) not found" in capsys.readouterr().err


def test_a_column_map_of_the_other_shape_is_refused(tokenizer_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "r.jsonl", [{"prompt": "q", "completions": ["a", "b"], "scores": [1, 0]}])
    assert prepare(data, tokenizer_dir, tmp_path / "out", "--format", "ranked", "--column-map", "chosen=better") == 1
    assert capsys.readouterr().err.strip() == (
        "error: --column-map target 'chosen' does not apply: the data is ranked "
        "(its targets: prompt, completions, scores, score, system); see --format"
    )


# ---------------------------------------------------------------------------------------------
# Scores, ties and what is counted


def test_ties_and_k_from_2_to_8_with_every_left_out_completion_and_row_counted(tokenizer_dir, tmp_path, capsys):
    nan, inf = float("nan"), float("inf")
    rows = [
        {"prompt": "p1", "completions": [f"c{i}" for i in range(8)], "scores": [5, 5, 4, 3, 3, 2, 1, 0]},  # kept, k=8
        {"prompt": "p2", "completions": ["a", "b"], "scores": [1, 0]},  # kept, k=2
        {"prompt": "p3", "completions": ["a", "b", "c"], "scores": [2, None, 1]},  # a missing score; k=2
        {"prompt": "p4", "completions": ["a", "b", "c", "d"], "scores": [1, nan, 2, inf]},  # 2 not finite; k=2
        {"prompt": "p5", "completions": ["", "a", "b"], "scores": [3, 2, 1]},  # empty content; k=2
        {"prompt": "p6", "completions": ["a", "b"], "scores": [1, None]},  # 1 left: row dropped
        {"prompt": "p7", "completions": ["a", "b", "c"], "scores": [2, 2, 2]},  # all tie: row dropped
        {"prompt": "p8", "completions": ["a", "b", "c"], "scores": [2, 2, None]},  # the rest tie: row dropped
        {"prompt": "p9", "completions": ["same", "same"], "scores": [1, 0]},  # no preference: row dropped
        {"prompt": "p10", "completions": ["a", "b", "c", "d", "e"], "scores": [3, 1, 2, 0, 4]},  # kept, k=5
        {"prompt": "p11", "completions": list("abcdef"), "scores": [0, 1, 2, 3, 4, 5]},  # kept, k=6
        {"prompt": "p12", "completions": list("abcdefg"), "scores": [1, 1, 1, 1, 1, 1, 0]},  # kept, k=7
        {"prompt": "p13", "completions": [{"text": "a", "score": 1}, {"text": "b"}, {"text": "c", "score": 0}]},  # k=2
        {"prompt": "p14", "completions": ["a"], "scores": [1]},  # fewer than 2
        {"prompt": "p15", "completions": [], "scores": []},  # fewer than 2
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    assert prepare(data, tokenizer_dir, out) == 0

    manifest = load_prepared(out).manifest
    counts = manifest["counts"]
    assert (counts["read"], counts["kept"]) == (15, 9)
    assert counts["dropped"] == {"all_completions_tie": 2, "fewer_than_2_completions": 3, "identical_completions": 1}
    assert counts["completions_dropped"] == {"empty_content": 1, "missing_score": 4, "non_finite_score": 2}
    assert counts["first_dropped"]["fewer_than_2_completions"] == f"{data} line 6: 1 usable completion of 2"
    assert counts["first_dropped"]["all_completions_tie"] == f"{data} line 7: all 3 completions score 2"
    assert counts["first_completion_dropped"] == {
        "empty_content": f"{data} line 5: completions[0] is empty",
        "missing_score": f"{data} line 3: scores[1] is null",
        "non_finite_score": f"{data} line 4: scores[1] is nan",
    }
    k = {"min": 2, "max": 8, "mean": 4.0, "counts": {"2": 5, "5": 1, "6": 1, "7": 1, "8": 1}}
    assert manifest["k"] == manifest["splits"]["train"]["k"] == k
    assert manifest["splits"]["train"]["completions_dropped"] == counts["completions_dropped"]

    kept = rows_of(out)
    assert [row["scores"] for row in kept] == [
        [5, 5, 4, 3, 3, 2, 1, 0],
        [1, 0],
        [2, 1],
        [1, 2],
        [2, 1],
        [3, 1, 2, 0, 4],
        [0, 1, 2, 3, 4, 5],
        [1, 1, 1, 1, 1, 1, 0],
        [1, 0],
    ]
    summary = capsys.readouterr().out
    for line in ("completions dropped: missing_score", "dropped: all_completions_tie", "k min/mean/max"):
        assert line in summary


def test_normalise_ranked_leaves_out_unscored_completions_and_keeps_their_source_names():
    ranked = normalise_ranked(
        Record("d.jsonl line 1", {"prompt": "q", "completions": ["a", "b", "c"], "scores": [None, 2, 1]}), {}, None
    )
    assert (ranked.prompt, ranked.completions, ranked.scores) == (
        [user("q")],
        [[assistant("b")], [assistant("c")]],
        [2, 1],
    )
    assert ranked.names == ["completions[1]", "completions[2]"]
    assert ranked.completions_dropped == [("missing_score", "scores[0] is null")]
    with pytest.raises(SkippedRow) as skipped:
        normalise_ranked(
            Record("d.jsonl line 2", {"prompt": "q", "completions": ["a", "b"], "scores": [1, None]}), {}, None
        )
    assert (skipped.value.reason, skipped.value.completions_dropped) == (
        "fewer_than_2_completions",
        [("missing_score", "scores[1] is null")],
    )


@pytest.mark.parametrize(
    "bad_row, message",
    [
        (
            {"prompt": "q", "completions": ["a", "b", "c"], "scores": [1, 0]},
            "line 2: 'scores' has 2 values but 'completions' has 3; give one score per completion, in the same order",
        ),
        (
            {"prompt": "q", "completions": ["a", "b"], "scores": [1, "high"]},
            "line 2: scores[1] is 'high' (str), not a number; scores and ranks are numbers "
            "(null leaves that completion out)",
        ),
        (
            {"instruction": "q", "completions": [{"response": "a", "overall_score": "7"}, {"response": "b"}]},
            "line 2: completions[0].overall_score is '7' (str), not a number",
        ),
        (
            {"prompt": "q", "completions": "a, b", "scores": [1, 0]},
            "line 2: 'completions' is str, not a list",
        ),
        (
            {"prompt": "q", "completions": [{"output": "a", "score": 1}, {"output": "b", "score": 0}]},
            "line 2: completions[0] has no text (keys: output, score); a completion object holds it under one of "
            "text, completion, response, content, answer",
        ),
    ],
    ids=["length-mismatch", "string-score", "string-object-score", "not-a-list", "no-text-key"],
)
def test_a_bad_row_is_one_error_naming_file_row_and_key(tokenizer_dir, tmp_path, capsys, bad_row, message):
    good = {"prompt": "q", "completions": ["a", "b"], "scores": [1, 0]}
    data = write_jsonl(tmp_path / "d.jsonl", [good, bad_row])
    assert prepare(data, tokenizer_dir, tmp_path / "out") == 1
    error = capsys.readouterr().err
    assert error.startswith(f"error: {data} {message}") and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Truncation, per completion

LONG_PROMPT = "what is " + "one plus " * 20 + "two?"
LONG = "it is " + "three " * 30 + "."


def test_truncation_fits_each_completion_with_the_prompt(tokenizer_dir, chat_tokenizer, tmp_path):
    rows = [{"prompt": LONG_PROMPT, "completions": [LONG, "no.", "it is two."], "scores": [1, 0, 2]}]
    out = tmp_path / "out"
    flags = ("--max-length", 40, "--max-prompt-length", 24, "--truncation", "keep_end")
    assert prepare(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer_dir, out, *flags) == 0

    hand = by_hand(chat_tokenizer, [user(LONG_PROMPT)], [[assistant(c)] for c in rows[0]["completions"]])
    assert len(hand["prompt_ids"]) > 24 and len(hand["completion_ids"][0]) > 16 >= len(hand["completion_ids"][2])
    (row,) = rows_of(out)
    assert row["prompt_ids"] == hand["prompt_ids"][-24:]  # keep_end: the prompt's start is cut
    assert row["completion_ids"] == [ids[:16] for ids in hand["completion_ids"]]  # each completion to fit 40
    counts = load_prepared(out).manifest["counts"]
    assert (counts["truncated"], counts["truncated_prompt"], counts["truncated_completion"]) == (1, 1, 1)


def test_overlength_drop_leaves_out_long_completions_and_drops_rows_left_without_a_preference(tokenizer_dir, tmp_path):
    rows = [
        {"prompt": LONG_PROMPT, "completions": [LONG, "no.", "it is two."], "scores": [1, 0, 2]},  # k=2 left
        {"prompt": LONG_PROMPT, "completions": [LONG, "no."], "scores": [2, 0]},  # 1 left
        {"prompt": LONG_PROMPT, "completions": [LONG, "no.", "yes."], "scores": [1, 0, 0]},  # the rest tie
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    assert prepare(data, tokenizer_dir, out, "--max-length", 40, "--max-prompt-length", 24, "--overlength", "drop") == 0

    counts = load_prepared(out).manifest["counts"]
    assert (counts["kept"], counts["dropped"], counts["completions_dropped"]) == (
        1,
        {"overlength": 2},
        {"overlength": 3},
    )
    assert counts["first_completion_dropped"]["overlength"].startswith(f"{data} line 1: prompt 24 + completions[0] ")
    assert counts["first_dropped"]["overlength"].endswith("over --max-length 40; what is left: 1 usable completion")
    (row,) = rows_of(out)
    assert row["scores"] == [0, 2] and len(row["completion_ids"]) == 2


def test_overlength_error_names_the_row_and_the_completion(tokenizer_dir, tmp_path, capsys):
    rows = [{"prompt": "q", "completions": ["no.", LONG], "scores": [0, 1]}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert prepare(data, tokenizer_dir, tmp_path / "out", "--max-length", 20, "--overlength", "error") == 1
    error = capsys.readouterr().err
    assert f"{data} line 1: prompt 4 + completions[1] " in error
    assert "over --max-length 20; raise --max-length, or pass --overlength truncate or drop" in error


# ---------------------------------------------------------------------------------------------
# Prepared columns, lengths and fingerprint


def fingerprint_of_whole_columns(splits: dict[str, list[dict]]) -> str:
    """The data fingerprint of ranked splits, each column concatenated in memory: offsets from 0 (int64) at each
    level of lists, then the values (ids as int32, scores as float32)."""
    digest = hashlib.sha256()
    for name in sorted(splits):
        table = pa.Table.from_pylist(splits[name], schema=features("ranked").arrow_schema)
        digest.update(name.encode())
        for column in RANKED_COLUMNS:
            array = table.column(column).combine_chunks()
            digest.update(column.encode())
            while pa.types.is_list(array.type):
                digest.update(np.asarray(array.offsets).astype(np.int64).tobytes())
                array = array.flatten()
            digest.update(np.asarray(array).astype(np.float32 if column == "scores" else np.int32).tobytes())
    return digest.hexdigest()


def test_the_fingerprint_covers_ids_and_scores(tokenizer_dir, tmp_path):
    rows = [
        {"prompt": "what is 2 plus 3?", "completions": ["5.", "6.", "five."], "scores": [2, 0, 2]},
        {"prompt": "say hi", "completions": ["hi.", "go away."], "scores": [1, 0]},
    ]
    changed = [rows[0], {**rows[1], "scores": [1.5, 0]}]  # the same order: only the value differs
    assert prepare(write_jsonl(tmp_path / "a.jsonl", rows), tokenizer_dir, tmp_path / "a") == 0
    assert prepare(write_jsonl(tmp_path / "b.jsonl", rows), tokenizer_dir, tmp_path / "b") == 0
    assert prepare(write_jsonl(tmp_path / "c.jsonl", changed), tokenizer_dir, tmp_path / "c") == 0
    a, b, c = (load_prepared(tmp_path / name) for name in "abc")

    assert a.fingerprint == b.fingerprint
    assert [r["completion_ids"] for r in rows_of(a.path)] == [r["completion_ids"] for r in rows_of(c.path)]
    assert c.fingerprint != a.fingerprint
    assert a.fingerprint == fingerprint_of_whole_columns({"train": ids_and_scores(rows_of(a.path))})
    assert a.fingerprint == data_fingerprint({"train": a.split("train").to_dataset()}, RANKED_COLUMNS)
    # written by `write_prepared` (as tests and the audit write data), with a manifest that names no shape
    copy = write_prepared(tmp_path / "copy", {"train": a.split("train")}, {"splits": {"train": {}}}, overwrite=False)
    assert (load_prepared(copy).shape, load_prepared(copy).fingerprint) == ("ranked", a.fingerprint)


def test_group_token_counts_and_lengths_come_from_arrow_offsets_without_pandas(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("dpokit.data.prepared.WRITE_BATCH_ROWS", 3)  # several record batches: chunked columns
    rows = [
        {
            "prompt": f"question {'one ' * i}?",
            "completions": ["a" * (i + 1), "b", "c c c"][: 2 + i % 2],
            "scores": [1, 0, 2][: 2 + i % 2],
        }
        for i in range(10)
    ]
    out = tmp_path / "out"
    assert prepare(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer_dir, out) == 0
    split = load_prepared(out).split("train")
    assert len(split.table.column("completion_ids").chunks) > 1

    python = list(split)
    prompt, tokens, sizes = group_token_counts(split)
    assert prompt.tolist() == [len(r["prompt_ids"]) for r in python]
    assert tokens.tolist() == [len(c) for r in python for c in r["completion_ids"]]
    assert sizes.tolist() == [len(r["completion_ids"]) for r in python] and tokens.dtype == sizes.dtype == np.int64
    assert pair_lengths(split).tolist() == [len(r["prompt_ids"]) + max(map(len, r["completion_ids"])) for r in python]
    picked = [9, 0, 4, 4]
    assert split[picked] == {c: [python[i][c] for i in picked] for c in RANKED_COLUMNS}
    check = (
        f"import sys; from dpokit.data.prepared import load_prepared, pair_lengths; "
        f"s = load_prepared({str(out)!r}).split('train'); s[[0, 9]]; pair_lengths(s); "
        "assert 'pandas' not in sys.modules, 'imported pandas'"
    )
    subprocess.run([sys.executable, "-c", check], check=True)


def test_eval_fraction_and_two_processes_prepare_ranked_rows_the_same(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("dpokit.data.pipeline.CHUNK_SIZE", 4)  # several chunks for the two workers
    rows = [
        {"prompt": f"what is {i} plus 1?", "completions": [f"{i + 1}.", f"{i}.", "no."], "scores": [2, 1, 0]}
        for i in range(20)
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert prepare(data, tokenizer_dir, tmp_path / "one", "--eval-fraction", 0.25) == 0
    assert prepare(data, tokenizer_dir, tmp_path / "two", "--eval-fraction", 0.25, "--num-proc", 2) == 0
    one, two = load_prepared(tmp_path / "one"), load_prepared(tmp_path / "two")
    assert one.fingerprint == two.fingerprint
    assert {name: len(one.split(name)) for name in one.splits} == {"train": 15, "eval": 5}
    assert one.manifest["splits"]["eval"]["k"] == {"min": 3, "max": 3, "mean": 3.0, "counts": {"3": 5}}


# ---------------------------------------------------------------------------------------------
# Pairs stay as they were


def test_a_pair_dataset_still_prepares_exactly_as_before(pairs_jsonl, tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    assert prepare(pairs_jsonl, tokenizer_dir, out) == 0

    prepared = load_prepared(out)
    assert (prepared.shape, prepared.is_ranked, prepared.manifest["shape"]) == ("pairs", False, "pairs")
    assert "k" not in prepared.manifest and "completions_dropped" not in prepared.manifest["counts"]
    split = prepared.split("train")
    assert split.column_names == list(COLUMNS)
    assert json.loads((out / "train" / "dataset_info.json").read_text())["features"] == features().to_dict()
    # The fingerprint as first defined: each column's offsets from 0 (int64), then its ids (int32).
    digest = hashlib.sha256(b"train")
    for column in COLUMNS:
        array = split.table.column(column).combine_chunks()
        digest.update(column.encode())
        digest.update(np.asarray(array.offsets).astype(np.int64).tobytes())
        digest.update(np.asarray(array.values).astype(np.int32).tobytes())
    assert prepared.fingerprint == digest.hexdigest()
    assert pair_lengths(split).tolist() == [
        len(p) + max(len(c), len(r)) for p, c, r in zip(split["prompt_ids"], split["chosen_ids"], split["rejected_ids"])
    ]
    # A manifest from before ranked data has no "shape": it is pairs.
    assert type(prepared)(prepared.path, {k: v for k, v in prepared.manifest.items() if k != "shape"}).shape == "pairs"


# ---------------------------------------------------------------------------------------------
# Demo data


def test_the_ranked_demo_file_is_what_the_script_writes_and_prepares_whole(tokenizer_dir, tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "examples" / "make_demo_data.py"), "--out", str(tmp_path / "demo")],
        check=True,
        capture_output=True,
    )
    committed = REPO / "examples" / "demo" / "data" / "ranked.jsonl"
    assert (tmp_path / "demo" / "ranked.jsonl").read_bytes() == committed.read_bytes()
    records = [json.loads(line) for line in committed.read_text().splitlines()]
    sizes = [len(r["completions"]) for r in records]
    assert len(records) == 60 and min(sizes) == 2 and max(sizes) == 5
    assert any(len(set(r["scores"])) < len(r["scores"]) for r in records)  # some ties

    out = tmp_path / "prepared"
    assert prepare(committed, tokenizer_dir, out) == 0
    manifest = load_prepared(out).manifest
    assert manifest["counts"]["kept"] == 60 and manifest["counts"]["dropped"] == {}
    assert manifest["k"]["counts"] == {str(k): sizes.count(k) for k in sorted(set(sizes))}
    assert math.isclose(manifest["k"]["mean"], round(sum(sizes) / 60, 4))
