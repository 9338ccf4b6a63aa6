"""`dpokit prepare` for unpaired data (KTO: one completion per row with a true/false label): the input shapes and
label values, each row's KL completion (the next row's, cyclic within a split), truncation of both completions,
what the manifest counts, and the errors that name the row or the split."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from test_prepare_ranked import assistant, prepare, rows_of, user, write_jsonl
from transformers import AutoTokenizer

from dpokit.data.formats import Record, SkippedRow, detect_shape, normalise_unpaired
from dpokit.data.prepared import RANKED_COLUMNS, load_prepared, pair_lengths

REPO = Path(__file__).resolve().parents[1]
LONG_PROMPT = "what is " + "one plus " * 20 + "two?"
LONG = "it is " + "three " * 30 + "."


def by_hand(tokenizer, prompt: list[dict], completion: list[dict]) -> tuple[list[int], list[int]]:
    """A row's prompt and completion ids from `apply_chat_template` (the independent computation)."""
    prompt_ids = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)["input_ids"])
    full = list(tokenizer.apply_chat_template(prompt + completion, tokenize=True)["input_ids"])
    assert full[: len(prompt_ids)] == prompt_ids
    return prompt_ids, full[len(prompt_ids) :]


def labels_and_kl_nan(rows: list[dict]) -> list[float]:
    """Each stored row's label, checking that its second score (the KL completion's) is NaN."""
    assert all(len(row["scores"]) == 2 and math.isnan(row["scores"][1]) for row in rows)
    return [row["scores"][0] for row in rows]


def assert_cyclic_kl_completions(rows: list[dict]) -> None:
    """Row i's KL completion is row i+1's own completion; the last row's is the first row's."""
    own = [row["completion_ids"][0] for row in rows]
    assert [row["completion_ids"][1] for row in rows] == own[1:] + own[:1]


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


# ---------------------------------------------------------------------------------------------
# Input shapes and the stored row


def test_plain_rows_store_their_completion_then_the_next_rows_and_label_then_nan(
    tokenizer_dir, chat_tokenizer, tmp_path, capsys
):
    rows = [
        {"prompt": "what is 2 plus 3?", "completion": "5.", "label": True},
        {"prompt": "say hi", "completion": "go away.", "label": False},
        {"prompt": "what is 2 plus 3?", "completion": "it is five.", "label": True},
        {"prompt": "say bye", "completion": "bye!", "label": True},
    ]
    out = tmp_path / "out"
    assert prepare(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer_dir, out) == 0

    prepared = load_prepared(out)
    assert (prepared.shape, prepared.is_unpaired, prepared.is_grouped) == ("unpaired", True, True)
    assert prepared.split("train").column_names == list(RANKED_COLUMNS)
    hand = [by_hand(chat_tokenizer, [user(row["prompt"])], [assistant(row["completion"])]) for row in rows]
    stored = rows_of(out)
    assert [row["prompt_ids"] for row in stored] == [prompt for prompt, _ in hand]
    completions = [completion for _, completion in hand]
    assert [row["completion_ids"] for row in stored] == [
        [completions[0], completions[1]],
        [completions[1], completions[2]],
        [completions[2], completions[3]],
        [completions[3], completions[0]],  # the last row's KL completion is the first row's
    ]
    assert labels_and_kl_nan(stored) == [1.0, 0.0, 1.0, 1.0]
    manifest = prepared.manifest
    assert manifest["labels"] == manifest["splits"]["train"]["labels"] == {"desirable": 3, "undesirable": 1}
    assert manifest["counts"]["formats"] == {"plain": 4}
    assert (manifest["counts"]["kl_completions_truncated"], manifest["counts"]["dropped"]) == (0, {})
    assert manifest["lengths"]["completion"]["max"] == max(map(len, completions))  # own completions only
    summary = capsys.readouterr().out
    assert "desirable kept" in summary and "undesirable kept" in summary and "KL completions cut" in summary


def test_conversational_rows_with_a_system_prompt_and_a_column_map(tokenizer_dir, chat_tokenizer, tmp_path):
    prompt = [{"role": "system", "content": "be rude"}, user("hi"), assistant("hello"), user("sum 2 and 2")]
    rows = [
        {"question": prompt, "reply": [assistant("4")], "thumbs_up": True},
        {"question": [user("q?")], "reply": assistant("no."), "thumbs_up": False},  # one message object
    ]
    out = tmp_path / "out"
    flags = ("--system-prompt", "be kind", "--column-map", "prompt=question,completion=reply,label=thumbs_up")
    assert prepare(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer_dir, out, *flags) == 0

    kind = {"role": "system", "content": "be kind"}
    first = by_hand(chat_tokenizer, [kind, *prompt[1:]], [assistant("4")])
    second = by_hand(chat_tokenizer, [kind, user("q?")], [assistant("no.")])
    stored = rows_of(out)
    assert [row["prompt_ids"] for row in stored] == [first[0], second[0]]
    assert [row["completion_ids"] for row in stored] == [[first[1], second[1]], [second[1], first[1]]]
    assert labels_and_kl_nan(stored) == [1.0, 0.0]
    manifest = load_prepared(out).manifest
    assert manifest["counts"]["formats"] == {"conversational": 2}
    assert manifest["column_map"] == {"prompt": "question", "completion": "reply", "label": "thumbs_up"}


def test_without_a_chat_template_the_completion_is_its_text_plus_eos(plain_tokenizer_dir, tmp_path):
    rows = [
        {"prompt": "question?", "completion": "yes.", "label": 1},
        {"prompt": "q2", "completion": "no.", "label": 0},
    ]
    out = tmp_path / "out"
    assert prepare(write_jsonl(tmp_path / "d.jsonl", rows), plain_tokenizer_dir, out) == 0

    tokenizer = AutoTokenizer.from_pretrained(plain_tokenizer_dir)
    yes, no = (
        tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for text in ("yes.", "no.")
    )
    first, _ = rows_of(out)
    assert first["prompt_ids"] == tokenizer("question?\n\n")["input_ids"]
    assert first["completion_ids"] == [yes, no]


# ---------------------------------------------------------------------------------------------
# Labels


def test_true_false_1_0_and_their_text_are_labels_and_a_null_label_skips_the_row(tokenizer_dir, tmp_path):
    labels = [True, False, 1, 0, 1.0, "true", "False", " TRUE ", "1", "0", None]
    rows = [{"prompt": f"q{i}", "completion": f"a{i}.", "label": label} for i, label in enumerate(labels)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    assert prepare(data, tokenizer_dir, out) == 0

    assert labels_and_kl_nan(rows_of(out)) == [1, 0, 1, 0, 1, 1, 0, 1, 1, 0]
    counts = load_prepared(out).manifest["counts"]
    assert (counts["read"], counts["kept"], counts["dropped"]) == (11, 10, {"missing_label": 1})
    assert counts["first_dropped"]["missing_label"] == f"{data} line 11: label is null"
    assert load_prepared(out).manifest["labels"] == {"desirable": 6, "undesirable": 4}


def test_csv_cells_are_text_labels_and_an_empty_cell_is_a_missing_label(tokenizer_dir, tmp_path):
    with open(tmp_path / "d.csv", "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerows(
            [["prompt", "completion", "label"], ["q1", "a1.", "true"], ["q2", "a2.", "0"], ["q3", "a3.", ""]]
        )
    out = tmp_path / "out"
    assert prepare(tmp_path / "d.csv", tokenizer_dir, out) == 0

    assert labels_and_kl_nan(rows_of(out)) == [1.0, 0.0]
    assert load_prepared(out).manifest["counts"]["first_dropped"] == {
        "missing_label": f"{tmp_path / 'd.csv'} line 4: label is empty"
    }


def test_normalise_unpaired_reads_the_label_and_skips_unusable_content():
    row = normalise_unpaired(Record("d.jsonl line 1", {"prompt": "q", "completion": "a", "label": "false"}), {}, None)
    assert (row.prompt, row.completion, row.label, row.format) == ([user("q")], [assistant("a")], False, "plain")
    with pytest.raises(SkippedRow) as skipped:
        normalise_unpaired(Record("d.jsonl line 2", {"prompt": "q", "completion": " ", "label": True}), {}, None)
    assert (skipped.value.reason, skipped.value.detail) == ("empty_content", "completion is empty")


@pytest.mark.parametrize(
    "label, shown",
    [("maybe", "'maybe' (str)"), (2, "2 (int)"), (0.5, "0.5 (float)"), ([True], "[True] (list)")],
    ids=["text", "two", "half", "list"],
)
def test_any_other_label_is_one_error_naming_file_row_and_column(tokenizer_dir, tmp_path, capsys, label, shown):
    rows = [{"prompt": "q", "completion": "a", "rating": True}, {"prompt": "q", "completion": "b", "rating": label}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert prepare(data, tokenizer_dir, tmp_path / "out", "--column-map", "label=rating") == 1
    error = capsys.readouterr().err
    assert error.strip() == (
        f"error: {data} line 2: rating is {shown}, not a label; a label is true (desirable) or false (undesirable), "
        'or 1/0, or "true"/"false" (null leaves the row out)'
    )
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Shape detection


def test_unpaired_shape_is_detected_from_the_columns_or_named_by_format(tokenizer_dir, pairs_jsonl, tmp_path, capsys):
    assert detect_shape({"prompt": "q", "completion": "a", "label": True}, {}) == "unpaired"
    assert detect_shape({"q": "q", "reply": "a", "ok": True}, {"completion": "reply", "label": "ok"}) == "unpaired"
    assert detect_shape({"prompt": "q", "completion": "a"}, {}) == "pairs"  # no label: not unpaired
    assert detect_shape({"prompt": "q", "chosen": "a", "completion": "b", "label": 1}, {}) == "pairs"
    assert detect_shape({"prompt": "q", "completions": ["a", "b"], "scores": [1, 0]}, {}) == "ranked"

    data = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": "a.", "label": i % 2} for i in range(3)]
    )
    assert prepare(data, tokenizer_dir, tmp_path / "auto") == 0
    assert prepare(data, tokenizer_dir, tmp_path / "named", "--format", "unpaired") == 0
    auto, named = load_prepared(tmp_path / "auto"), load_prepared(tmp_path / "named")
    assert (auto.shape, named.shape, named.manifest["format"]) == ("unpaired", "unpaired", "unpaired")
    assert auto.fingerprint == named.fingerprint

    assert prepare(pairs_jsonl, tokenizer_dir, tmp_path / "out", "--format", "unpaired") == 1
    err = capsys.readouterr().err
    assert f"{pairs_jsonl} line 1: no 'completion' column; columns found: prompt, chosen, rejected" in err
    assert prepare(data, tokenizer_dir, tmp_path / "out", "--format", "unpaired", "--column-map", "chosen=x") == 1
    assert capsys.readouterr().err.strip() == (
        "error: --column-map target 'chosen' does not apply: the data is unpaired "
        "(its targets: prompt, completion, label, system); see --format"
    )


# ---------------------------------------------------------------------------------------------
# Splits and the cyclic shift


def test_a_split_of_one_kept_row_is_an_error_naming_the_split(tokenizer_dir, tmp_path, capsys):
    rows = [{"prompt": "q", "completion": "a.", "label": True}, {"prompt": "q", "completion": "b.", "label": None}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert prepare(data, tokenizer_dir, tmp_path / "out") == 1
    assert capsys.readouterr().err.strip() == (
        f"error: the train split keeps only 1 unpaired row from {data} (2 read; dropped: missing_label 1): KTO's KL "
        "estimate gives each row the completion of another, so an unpaired split needs at least 2 rows; "
        "add rows to the data"
    )
    assert not (tmp_path / "out").exists()

    four = write_jsonl(
        tmp_path / "four.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}.", "label": True} for i in range(4)]
    )
    assert prepare(four, tokenizer_dir, tmp_path / "out", "--eval-fraction", 0.25) == 1
    error = capsys.readouterr().err
    assert error.startswith("error: the eval split keeps only 1 unpaired row from ")
    assert error.strip().endswith("raise --eval-fraction, or prepare without an eval split")


def test_each_split_gets_its_own_cyclic_shift_with_one_or_two_processes(tokenizer_dir, tmp_path, monkeypatch):
    monkeypatch.setattr("dpokit.data.pipeline.CHUNK_SIZE", 3)  # the shift runs across chunk boundaries
    rows = [{"prompt": f"what is {i} plus 1?", "completion": f"{i + 1}.", "label": i % 3 != 0} for i in range(12)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert prepare(data, tokenizer_dir, tmp_path / "one", "--eval-fraction", 0.25) == 0
    assert prepare(data, tokenizer_dir, tmp_path / "two", "--eval-fraction", 0.25, "--num-proc", 2) == 0

    one, two = load_prepared(tmp_path / "one"), load_prepared(tmp_path / "two")
    assert one.fingerprint == two.fingerprint
    assert {name: len(one.split(name)) for name in one.splits} == {"train": 9, "eval": 3}
    train, eval_ = rows_of(one.path), rows_of(one.path, "eval")
    assert_cyclic_kl_completions(train)
    assert_cyclic_kl_completions(eval_)
    own_train = {tuple(row["completion_ids"][0]) for row in train}
    assert not any(tuple(row["completion_ids"][1]) in own_train for row in eval_)  # no eval row sees train's
    labels = one.manifest["splits"]
    assert labels["eval"]["labels"]["desirable"] + labels["train"]["labels"]["desirable"] == 8
    assert one.manifest["labels"] == {"desirable": 8, "undesirable": 4}


# ---------------------------------------------------------------------------------------------
# Truncation


def test_the_kl_completion_is_cut_to_fit_behind_a_longer_prompt_and_counted(tokenizer_dir, chat_tokenizer, tmp_path):
    rows = [
        {"prompt": LONG_PROMPT, "completion": "no.", "label": False},
        {"prompt": "q", "completion": LONG, "label": True},
        {"prompt": "say hi", "completion": "hi.", "label": True},
    ]
    hand = [by_hand(chat_tokenizer, [user(row["prompt"])], [assistant(row["completion"])]) for row in rows]
    max_length = max(len(prompt) + len(completion) for prompt, completion in hand)  # no own completion is cut
    assert len(hand[0][0]) + len(hand[1][1]) > max_length  # row 1's long completion does not fit behind row 0's
    out = tmp_path / "out"
    assert prepare(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer_dir, out, "--max-length", max_length) == 0

    stored = rows_of(out)
    room = max_length - len(hand[0][0])
    assert stored[0]["completion_ids"] == [hand[0][1], hand[1][1][:room]]  # the KL completion keeps its start
    assert stored[1]["completion_ids"] == [hand[1][1], hand[2][1]]
    counts = load_prepared(out).manifest["counts"]
    assert (counts["kl_completions_truncated"], counts["truncated"], counts["kept"]) == (1, 0, 3)
    assert max(pair_lengths(load_prepared(out).split("train"))) == max_length


def test_the_own_completion_is_truncated_dropped_or_reported_as_a_chosen_is(tokenizer_dir, tmp_path, capsys):
    rows = [
        {"prompt": "q", "completion": LONG, "label": True},
        {"prompt": "say hi", "completion": "hi.", "label": False},
        {"prompt": "say bye", "completion": "bye.", "label": True},
    ]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    assert prepare(data, tokenizer_dir, tmp_path / "cut", "--max-length", 20) == 0
    cut = load_prepared(tmp_path / "cut")
    assert (cut.manifest["counts"]["truncated_completion"], cut.manifest["counts"]["kept"]) == (1, 3)
    assert max(pair_lengths(cut.split("train"))) <= 20

    assert prepare(data, tokenizer_dir, tmp_path / "drop", "--max-length", 20, "--overlength", "drop") == 0
    dropped = load_prepared(tmp_path / "drop").manifest
    assert (dropped["counts"]["dropped"], dropped["labels"]) == ({"overlength": 1}, {"desirable": 1, "undesirable": 1})
    assert dropped["counts"]["first_dropped"]["overlength"].startswith(f"{data} line 1: prompt 4 + completion ")

    assert prepare(data, tokenizer_dir, tmp_path / "error", "--max-length", 20, "--overlength", "error") == 1
    error = capsys.readouterr().err
    assert f"{data} line 1: prompt 4 + completion " in error
    assert "over --max-length 20; raise --max-length, or pass --overlength truncate or drop" in error

    long_prompt = [{"prompt": LONG_PROMPT, "completion": "a.", "label": True}, *rows[1:]]
    data = write_jsonl(tmp_path / "long.jsonl", long_prompt)
    assert prepare(data, tokenizer_dir, tmp_path / "full", "--max-length", 20) == 0  # the prompt fills it
    assert load_prepared(tmp_path / "full").manifest["counts"]["dropped"] == {"prompt_over_max_length": 1}


# ---------------------------------------------------------------------------------------------
# Demo data


def test_the_unpaired_demo_file_is_what_the_script_writes_and_prepares_whole(tokenizer_dir, tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "examples" / "make_demo_data.py"), "--out", str(tmp_path / "demo")],
        check=True,
        capture_output=True,
    )
    committed = REPO / "examples" / "demo" / "data" / "unpaired.jsonl"
    assert (tmp_path / "demo" / "unpaired.jsonl").read_bytes() == committed.read_bytes()
    records = [json.loads(line) for line in committed.read_text().splitlines()]
    desirable = sum(record["label"] for record in records)
    assert len(records) == 80 and desirable == 48  # unbalanced, as thumbs-up/down data is
    assert all(isinstance(r["prompt"], str) and isinstance(r["completion"], str) for r in records)

    out = tmp_path / "prepared"
    assert prepare(committed, tokenizer_dir, out) == 0
    manifest = load_prepared(out).manifest
    assert manifest["counts"]["kept"] == 80 and manifest["counts"]["dropped"] == {}
    assert manifest["labels"] == {"desirable": 48, "undesirable": 32}
    assert_cyclic_kl_completions(rows_of(out))
