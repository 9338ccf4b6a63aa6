"""Reading pair files and normalising the three input formats to messages (no tokenizer needed)."""

from __future__ import annotations

import json

import pytest

from dpokit.data.formats import Record, SkippedRow, normalise, open_records, parse_column_map
from dpokit.errors import DpokitError


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def pair_of(row, format="auto", column_map=None, system_prompt=None):
    return normalise(Record("data.jsonl line 1", row), format, column_map or {}, system_prompt)


# ---------------------------------------------------------------------------------------------
# The three formats


def test_plain_strings_become_one_user_turn_and_one_assistant_turn():
    pair = pair_of({"prompt": "what is 2 plus 2?", "chosen": "4.", "rejected": "5."})
    assert pair.format == "plain"
    assert pair.prompt == [user("what is 2 plus 2?")]
    assert pair.chosen == [assistant("4.")]
    assert pair.rejected == [assistant("5.")]


def test_conversational_rows_keep_their_messages_and_drop_other_keys():
    prompt = [{"role": "system", "content": "be brief"}, user("hi"), assistant("hello"), user("sum 2 and 2")]
    pair = pair_of({"prompt": prompt, "chosen": [{**assistant("4"), "name": "bot"}], "rejected": [assistant("5")]})
    assert pair.format == "conversational"
    assert pair.prompt == prompt
    assert pair.chosen == [assistant("4")]
    assert pair.rejected == [assistant("5")]


def test_implicit_message_lists_split_at_the_last_shared_turn():
    shared = [user("hi"), assistant("hello"), user("sum 2 and 2")]
    pair = pair_of({"chosen": shared + [assistant("4")], "rejected": shared + [assistant("5")]})
    assert pair.format == "implicit"
    assert pair.prompt == shared
    assert pair.chosen == [assistant("4")]
    assert pair.rejected == [assistant("5")]


@pytest.mark.parametrize(
    "chosen, rejected",
    [
        # rejected goes on after its answer: a user turn would be trained on
        (
            [user("hi"), assistant("hello"), user("sum 2 and 2"), assistant("4")],
            [user("hi"), assistant("hello"), user("sum 2 and 2"), assistant("5"), user("sure?")],
        ),
        # chosen is the first exchange only, rejected goes on
        ([user("hi"), assistant("hello")], [user("hi"), assistant("hello"), user("x"), assistant("y")]),
        # they diverge at the first answer, then both go on
        (
            [user("hi"), assistant("hello!"), user("what is 2 plus 3?"), assistant("5.")],
            [user("hi"), assistant("go away"), user("what is 2 plus 3?"), assistant("6.")],
        ),
    ],
)
def test_implicit_conversations_that_diverge_before_the_last_turn_are_skipped(chosen, rejected):
    with pytest.raises(SkippedRow) as skipped:
        pair_of({"chosen": chosen, "rejected": rejected})
    assert skipped.value.reason == "diverges_before_last_turn"


def test_anthropic_hh_text_becomes_turns_with_the_shared_turns_as_prompt():
    shared = "\n\nHuman: what is 2 plus 2?\n\nAssistant: why?\n\nHuman: just tell me"
    pair = pair_of({"chosen": shared + "\n\nAssistant: It is 4.", "rejected": shared + "\n\nAssistant: Go away."})
    assert pair.format == "implicit"
    assert pair.prompt == [user("what is 2 plus 2?"), assistant("why?"), user("just tell me")]
    assert pair.chosen == [assistant("It is 4.")]
    assert pair.rejected == [assistant("Go away.")]


def test_text_prompt_beside_whole_conversations_is_read_as_implicit():
    # UltraFeedback-binarized style: the conversations repeat the prompt as their first turn.
    row = {
        "prompt": "sum 2 and 2",
        "chosen": [user("sum 2 and 2"), assistant("4")],
        "rejected": [user("sum 2 and 2"), assistant("5")],
    }
    pair = pair_of(row)
    assert (pair.format, pair.prompt, pair.chosen) == ("implicit", [user("sum 2 and 2")], [assistant("4")])


def test_explicit_format_overrides_detection():
    row = {"prompt": [user("hi")], "chosen": [assistant("a")], "rejected": [assistant("b")]}
    with pytest.raises(SkippedRow) as skipped:
        pair_of(row, format="plain")
    assert (skipped.value.reason, skipped.value.detail) == ("non_string_content", "prompt is list, not a string")


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ([user("hi")], [{"role": "system", "content": "be kind"}, user("hi")]),
        (
            [{"role": "system", "content": "be rude"}, user("hi")],
            [{"role": "system", "content": "be kind"}, user("hi")],
        ),
    ],
    ids=["added", "replaced"],
)
def test_system_prompt_is_added_or_replaces_the_system_turn(prompt, expected):
    pair = pair_of(
        {"prompt": prompt, "chosen": [assistant("a")], "rejected": [assistant("b")]}, system_prompt="be kind"
    )
    assert pair.prompt == expected


# ---------------------------------------------------------------------------------------------
# Column map


def test_column_map_renames_the_users_columns():
    mapping = parse_column_map("prompt=question, chosen=better,rejected=worse")
    assert mapping == {"prompt": "question", "chosen": "better", "rejected": "worse"}
    pair = pair_of({"question": "q?", "better": "good", "worse": "bad"}, column_map=mapping)
    assert (pair.prompt, pair.chosen, pair.rejected) == ([user("q?")], [assistant("good")], [assistant("bad")])


@pytest.mark.parametrize(
    "text, message",
    [
        ("chosen", "--column-map entry 'chosen' is not target=source (for example chosen=better)"),
        ("answer=better", "--column-map target 'answer' is not one of prompt, chosen, rejected"),
    ],
)
def test_column_map_rejects_bad_entries(text, message):
    with pytest.raises(DpokitError) as error:
        parse_column_map(text)
    assert str(error.value) == message


def test_missing_column_lists_the_columns_found_and_suggests_column_map():
    with pytest.raises(DpokitError) as error:
        pair_of({"prompt": "q", "better": "a", "worse": "b"})
    assert str(error.value) == (
        "data.jsonl line 1: no 'chosen' column; columns found: prompt, better, worse; "
        "name yours with --column-map chosen=<column>"
    )


def test_missing_mapped_column_names_the_mapping():
    with pytest.raises(DpokitError) as error:
        pair_of({"prompt": "q", "better": "a", "rejected": "b"}, column_map={"chosen": "preferred"})
    assert str(error.value) == (
        "data.jsonl line 1: column 'preferred' (mapped to chosen by --column-map) not found; "
        "columns found: prompt, better, rejected"
    )


# ---------------------------------------------------------------------------------------------
# Rows that are skipped, with their reason


@pytest.mark.parametrize(
    "row, reason, detail",
    [
        ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "empty_content", "chosen is empty"),
        ({"prompt": "q", "chosen": "a", "rejected": None}, "non_string_content", "rejected is NoneType, not a string"),
        (
            {"prompt": "q", "chosen": "a", "rejected": "a"},
            "identical_chosen_rejected",
            "chosen and rejected are the same",
        ),
        (
            {"prompt": [{"from": "human", "value": "q"}], "chosen": [assistant("a")], "rejected": [assistant("b")]},
            "malformed_message",
            "prompt message 0 is not {role, content} (found from, value)",
        ),
        (
            {"prompt": [user("q")], "chosen": [assistant(3)], "rejected": [assistant("b")]},
            "non_string_content",
            "chosen message 0 is int, not a string",
        ),
        (
            {"chosen": [user("a"), assistant("x")], "rejected": [user("b"), assistant("y")]},
            "no_shared_prompt",
            "chosen and rejected share no turns before an assistant answer",
        ),
        (
            {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "Assistant: b"},
            "unparseable_conversation",
            "rejected is text without a prompt column but not Human:/Assistant: turns",
        ),
        (
            {"chosen": "\n\nHuman: q\n\nAssistant:", "rejected": "\n\nHuman: q\n\nAssistant: b"},
            "empty_content",
            "chosen turn 1 is empty",
        ),
    ],
    ids=[
        "empty",
        "non-string",
        "identical",
        "sharegpt-keys",
        "non-string-message",
        "no-shared",
        "not-hh",
        "empty-hh-turn",
    ],
)
def test_unusable_rows_are_skipped_with_their_reason(row, reason, detail):
    with pytest.raises(SkippedRow) as skipped:
        pair_of(row)
    assert (skipped.value.reason, skipped.value.detail) == (reason, detail)


# ---------------------------------------------------------------------------------------------
# Files


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_rows_carry_file_and_line_and_blank_lines_are_allowed(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n{"prompt": "d", "chosen": "e", "rejected": "f"}\n'
    )
    records = list(open_records(str(path)))
    assert [r.location for r in records] == [f"{path} line 1", f"{path} line 3"]
    assert records[1].row == {"prompt": "d", "chosen": "e", "rejected": "f"}


def test_malformed_json_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "d", "chosen": "e" "rejected": "f"}\n')
    with pytest.raises(DpokitError) as error:
        list(open_records(str(path)))
    assert str(error.value) == (
        f"{path} line 2: not valid JSON (Expecting ',' delimiter at column 31); fix or remove that line"
    )


def test_malformed_json_array_names_the_line_in_the_file(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n {"prompt": "a", "chosen": "b", "rejected": "c"},\n {"prompt": "d" "chosen": "e"}\n]\n')
    with pytest.raises(DpokitError) as error:
        list(open_records(str(path)))
    assert str(error.value) == f"{path} line 3: not valid JSON (Expecting ',' delimiter at column 17); fix the file"


def test_a_json_line_that_is_not_an_object_is_an_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('["a", "b"]\n')
    with pytest.raises(DpokitError) as error:
        list(open_records(str(path)))
    assert str(error.value) == f"{path} line 1: expected a JSON object with prompt/chosen/rejected, got list"


def test_json_array_csv_and_parquet_files_read_the_same_rows(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr("dpokit.data.formats.PARQUET_BATCH_ROWS", 1)  # Parquet rows are decoded a batch at a time

    rows = [
        {"prompt": "p1", "chosen": "c1, with a comma", "rejected": "r1"},
        {"prompt": "p2", "chosen": "c2", "rejected": "r2"},
    ]
    (tmp_path / "a.json").write_text(json.dumps(rows, indent=1))
    with open(tmp_path / "b.csv", "w", newline="") as stream:
        import csv

        writer = csv.DictWriter(stream, fieldnames=["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerows(rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    for name in ("a.json", "b.csv", "c.parquet"):
        assert [r.row for r in open_records(str(tmp_path / name))] == rows, name
        source = open_records(str(tmp_path / name))  # read lazily: counted, then read again the same
        assert source.count() == 2 and [r.row for r in source] == rows, name
    assert [r.location for r in open_records(str(tmp_path / "b.csv"))] == [
        f"{tmp_path / 'b.csv'} line {n}" for n in (2, 3)
    ]


def test_a_folder_is_read_file_by_file_in_sorted_order(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "2", "chosen": "c", "rejected": "r"}])
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1", "chosen": "c", "rejected": "r"}])
    (tmp_path / "notes.txt").write_text("ignored")
    assert [r.row["prompt"] for r in open_records(str(tmp_path))] == ["1", "2"]


def test_a_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = write_jsonl(tmp_path / "d.json", [{"prompt": "1", "chosen": "c", "rejected": "r"}] * 2)
    assert len(list(open_records(str(path)))) == 2


def test_missing_file_and_empty_folder_are_errors(tmp_path):
    with pytest.raises(DpokitError, match=r"data file .*nope\.jsonl does not exist"):
        open_records(str(tmp_path / "nope.jsonl"))
    with pytest.raises(DpokitError, match=r"has no \.json/\.jsonl/\.csv/\.parquet files"):
        open_records(str(tmp_path))


def test_a_dataset_name_goes_to_load_dataset_with_subset_and_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, subset, split):
        calls.append((name, subset, split))
        return datasets.Dataset.from_list([{"prompt": "q", "chosen": "a", "rejected": "b"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records = list(open_records("org/pairs", split="test", subset="small"))
    assert calls == [("org/pairs", "small", "test")]
    assert [(r.location, r.row) for r in records] == [
        ("org/pairs[test] row 0", {"prompt": "q", "chosen": "a", "rejected": "b"})
    ]


def test_a_dataset_that_cannot_be_loaded_is_one_error_with_the_fix(monkeypatch):
    import datasets

    def offline(name, subset, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DpokitError) as error:
        open_records("org/pairs")
    assert str(error.value) == (
        "could not load dataset 'org/pairs' (split 'train'): offline; "
        "pass a local .json/.jsonl/.csv/.parquet file or folder, or check --subset and --split"
    )
