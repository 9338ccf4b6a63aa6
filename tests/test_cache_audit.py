"""`dpokit cache audit`: its numbers equal a direct computation from the cache's arrays and the prepared rows,
it finds planted flaws, and the filtered dataset it writes records the filter and trains on its copied cache."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import tiny
from conftest import ref_logps_args, train_cli_args, write_test_prepared

from dpokit.cli import main
from dpokit.data.prepared import COLUMNS, load_prepared
from dpokit.errors import DpokitError
from dpokit.fingerprint import data_fingerprint
from dpokit.reference.audit import AuditOptions, run_audit

NUM_TRAIN = 24
IDENTICAL = [3, 11]  # train rows whose rejected completion is the chosen one
DROP = "identical,ref-disagrees,dup-prompts"
MIN_MARGIN = -1.0


def planted_rows() -> list[dict]:
    """Arithmetic and style pairs (completions of different lengths) with identical pairs and duplicate prompts."""
    arithmetic, style = tiny.preference_rows(22), tiny.style_rows(8)  # style pairs: the reference disagrees strongly
    rows = arithmetic[:18] + style[:6] + arithmetic[18:] + style[6:]  # train 24, eval 6, both kinds in each
    for row in IDENTICAL:
        rows[row]["rejected"] = rows[row]["chosen"]
    rows[7]["prompt"] = rows[2]["prompt"]  # an exact duplicate
    rows[9]["prompt"] = f"  {rows[2]['prompt'].upper()} "  # the same prompt but for case and spaces
    rows[NUM_TRAIN + 1]["prompt"] = rows[1]["prompt"]  # an eval prompt also in train
    return rows


def normalised(text: str) -> str:
    return " ".join(text.casefold().split())


@pytest.fixture(scope="module")
def planted(tiny_model_dir, tmp_path_factory) -> dict:
    """The planted data, its cache, and one `dpokit cache audit` run over them that writes a filtered copy."""
    root = tmp_path_factory.mktemp("audit")
    prepared = write_test_prepared(root / "prepared", tiny_model_dir, planted_rows(), num_train=NUM_TRAIN)
    cache = root / "ref.h5"
    assert main(ref_logps_args(prepared, tiny_model_dir, cache, "--batch-size", "8")) == 0
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(
            [
                "cache",
                "audit",
                str(cache),
                "--top",
                "3",
                "--write-filtered",
                str(root / "clean"),
                "--drop",
                DROP,
                "--min-margin",
                str(MIN_MARGIN),
            ]
        )
    assert code == 0
    return {
        "root": root,
        "prepared": prepared,
        "cache": cache,
        "stdout": stdout.getvalue(),
        "audit": json.loads((root / "ref-audit" / "audit.json").read_text()),
    }


def cache_arrays(path: Path, split: str) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as handle:
        return {
            name: handle[split][name][()]
            for name in ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens")
        }


def expected_margins(cache: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    a = cache_arrays(cache, split)
    margin = a["chosen_logps"].astype(np.float64) - a["rejected_logps"]
    per_token = (
        a["chosen_logps"].astype(np.float64) / a["chosen_tokens"]
        - a["rejected_logps"].astype(np.float64) / a["rejected_tokens"]
    )
    return margin, per_token


def test_audit_numbers_equal_a_direct_computation_from_the_cache(planted):
    for split in ("train", "eval"):
        a = cache_arrays(planted["cache"], split)
        margin, per_token = expected_margins(planted["cache"], split)
        got = planted["audit"]["splits"][split]
        assert got["pairs"] == len(margin)
        assert got["accuracy"] == pytest.approx(np.mean(a["chosen_logps"] > a["rejected_logps"]))
        assert got["margin"]["mean"] == pytest.approx(margin.mean(), abs=1e-6)
        assert got["margin"]["std"] == pytest.approx(margin.std(), abs=1e-6)
        assert got["margin"]["p50"] == pytest.approx(np.median(margin), abs=1e-6)
        assert got["normalised_margin"]["mean"] == pytest.approx(per_token.mean(), abs=1e-6)
        assert got["length"]["chosen_mean"] == pytest.approx(a["chosen_tokens"].mean())
        assert got["length"]["chosen_longer"] == pytest.approx(np.mean(a["chosen_tokens"] > a["rejected_tokens"]))
        diff = a["chosen_tokens"].astype(np.int64) - a["rejected_tokens"]
        assert got["length"]["correlation_with_margin"] == pytest.approx(np.corrcoef(diff, margin)[0, 1], abs=1e-6)


def test_audit_finds_identical_pairs_and_exact_and_near_duplicate_prompts(planted):
    rows = planted_rows()
    train, eval_ = rows[:NUM_TRAIN], rows[NUM_TRAIN:]
    prepared = load_prepared(planted["prepared"])
    prompt_ids = [tuple(ids) for ids in prepared.split("train")["prompt_ids"]]
    got = planted["audit"]["splits"]
    assert got["train"]["identical"] == {"count": len(IDENTICAL), "rows": IDENTICAL}
    assert got["eval"]["identical"]["count"] == 0
    duplicates = got["train"]["duplicate_prompts"]
    assert duplicates["exact"]["rows"] == len(prompt_ids) - len(set(prompt_ids))
    assert duplicates["near"]["rows"] == len(train) - len({normalised(r["prompt"]) for r in train})
    assert duplicates["near"]["rows"] == duplicates["exact"]["rows"] + 1  # row 9 differs in case and spaces only
    assert [2, 7, 9] in duplicates["near"]["examples"] and [2, 7] in duplicates["exact"]["examples"]
    train_prompts = {normalised(r["prompt"]) for r in train}
    assert (
        got["eval"]["duplicate_prompts"]["in_train"]
        == sum(normalised(r["prompt"]) in train_prompts for r in eval_)
        >= 1
    )


def test_audit_lists_the_pairs_the_reference_disagrees_with_most_with_decoded_previews(planted):
    margin, _ = expected_margins(planted["cache"], "train")
    worst = [int(i) for i in np.argsort(margin, kind="stable")[:3] if margin[i] < 0]  # ties: the lower row first
    entries = planted["audit"]["splits"]["train"]["disagreements"]
    assert [e["row"] for e in entries] == worst
    rows = planted_rows()
    for entry in entries:
        assert entry["margin"] == pytest.approx(margin[entry["row"]], abs=1e-6)
        assert normalised(rows[entry["row"]]["prompt"]).startswith(normalised(entry["prompt"]).rstrip("…"))
        assert rows[entry["row"]]["chosen"].startswith(entry["chosen"].rstrip("…"))
    assert "reference accuracy" in planted["stdout"] and "prefers the rejected" in planted["stdout"]


def test_audit_writes_json_and_png_plots_next_to_the_cache(planted):
    out = planted["root"] / "ref-audit"
    for name in ("margins.png", "length_vs_margin.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / ".dpokit-artifact.json").is_file()  # an audit folder dpokit may replace on the next audit
    assert planted["audit"]["cache"] == str(planted["cache"].resolve())
    assert set(planted["audit"]["splits"]) == {"train", "eval"}
    assert planted["audit"]["filter"]["prepared"] == str((planted["root"] / "clean").resolve())


def expected_filter(cache: Path, source, split: str) -> tuple[list[int], dict[str, int]]:
    """The rows `DROP` keeps and the count each reason drops, computed from the cache arrays and planted text."""
    margin, _ = expected_margins(cache, split)
    rows = list(source.split(split))
    identical = np.array([r["chosen_ids"] == r["rejected_ids"] for r in rows])
    low = ~identical & (margin < MIN_MARGIN)
    seen, kept = set(), []
    for i, _ in enumerate(rows):  # the first surviving row of each prompt (ids decode to the planted text)
        key = normalised(planted_rows()[i + (NUM_TRAIN if split == "eval" else 0)]["prompt"])
        if not identical[i] and not low[i] and key not in seen:
            seen.add(key)
            kept.append(i)
    dropped = {
        "identical": int(identical.sum()),
        "ref-disagrees": int(low.sum()),
        "dup-prompts": len(rows) - int(identical.sum()) - int(low.sum()) - len(kept),
    }
    return kept, dropped


def test_filtered_data_keeps_the_right_rows_and_records_the_filter(planted):
    root, cache = planted["root"], planted["cache"]
    clean = load_prepared(root / "clean")
    source = load_prepared(planted["prepared"])
    record = clean.manifest["filter"]
    assert record["drop"] == DROP.split(",") and record["min_margin"] == MIN_MARGIN
    assert record["source_cache"] == str(cache.resolve()) and record["source_prepared"] == str(
        planted["prepared"].resolve()
    )
    for split in ("train", "eval"):
        rows = list(source.split(split))
        kept, dropped = expected_filter(cache, source, split)
        if split == "eval":  # copied whole unless --filter-eval: eval metrics stay comparable
            kept, dropped = list(range(len(rows))), {}
        assert record["splits"][split]["dropped"] == dropped
        assert list(clean.split(split)) == [rows[i] for i in kept]
        assert clean.manifest["splits"][split]["rows"] == len(kept)
        with h5py.File(record["cache"], "r") as handle:
            for name, values in cache_arrays(cache, split).items():
                np.testing.assert_array_equal(handle[split][name][()], values[kept])
    assert clean.fingerprint == data_fingerprint({s: clean.split(s) for s in clean.splits}, COLUMNS)
    with h5py.File(record["cache"], "r") as handle:
        assert handle.attrs["data_fingerprint"] == clean.fingerprint
        assert handle.attrs["reference_fingerprint"] == h5py.File(cache, "r").attrs["reference_fingerprint"]
    assert f"dpokit train --data {root / 'clean'}" in " ".join(planted["stdout"].split())


def test_filter_eval_filters_the_eval_split_by_the_same_rules(planted, tmp_path):
    from rich.console import Console

    out = tmp_path / "clean"
    run_audit(
        AuditOptions(
            cache=str(planted["cache"]),
            out=str(tmp_path / "audit"),
            write_filtered=str(out),
            drop=DROP.split(","),
            min_margin=MIN_MARGIN,
            filter_eval=True,
        ),
        Console(file=io.StringIO()),
    )
    source, clean = load_prepared(planted["prepared"]), load_prepared(out)
    kept, dropped = expected_filter(planted["cache"], source, "eval")
    assert clean.manifest["filter"]["splits"]["eval"]["dropped"] == dropped and sum(dropped.values()) > 0
    assert list(clean.split("eval")) == [list(source.split("eval"))[i] for i in kept]


def test_filtered_data_trains_on_its_copied_cache(planted, tiny_model_dir, tmp_path):
    from dpokit.metrics import read_metrics

    record = planted["audit"]["filter"]
    run = tmp_path / "run"
    args = train_cli_args(
        tiny_model_dir,
        Path(record["prepared"]),
        run,
        "--max-steps",
        "2",
        "data.batch_size=2",
        "reference.source=cache",
        f"reference.cache={record['cache']}",
    )
    assert main(args) == 0
    steps = read_metrics(run, "train")
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)  # the copied values are the reference's own


def test_without_matplotlib_the_audit_says_so_in_one_line_and_still_writes_its_json(
    planted, tmp_path, monkeypatch, capsys
):
    import sys

    from rich.console import Console

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an environment without it
    console = Console(file=io.StringIO(), width=200)
    audit = run_audit(AuditOptions(cache=str(planted["cache"]), out=str(tmp_path / "audit")), console)
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == [
        "note: no plots: drawing the audit plots needs matplotlib, a dpokit dependency missing here: pip install matplotlib"
    ]
    assert audit.plots == [] and sorted(p.name for p in (tmp_path / "audit").iterdir()) == [
        ".dpokit-artifact.json",
        "audit.json",
    ]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"drop": ["identicl"], "write_filtered": "x"}, "did you mean identical?"),
        ({"drop": ["identical"]}, "--drop needs --write-filtered"),
        ({"min_margin": -2.0, "drop": ["identical"], "write_filtered": "x"}, "add ref-disagrees to --drop"),
    ],
)
def test_options_that_do_not_fit_together_are_refused_before_any_work(options, message):
    with pytest.raises(DpokitError, match=re.escape(message)):
        run_audit(AuditOptions(cache="no-such.h5", **options))


def test_an_earlier_filtered_output_is_refused_without_overwrite(planted):
    with pytest.raises(DpokitError, match="already exists; pass --overwrite"):
        run_audit(
            AuditOptions(
                cache=str(planted["cache"]),
                write_filtered=str(planted["root"] / "clean"),
                drop=["identical"],
                out=str(planted["root"] / "second-audit"),
            )
        )


def test_overwrite_never_replaces_a_folder_or_file_dpokit_did_not_create(planted, tmp_path):
    from rich.console import Console

    mine, my_file = tmp_path / "mine", tmp_path / "mine.h5"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    my_file.write_text("my file")
    for write_filtered, filtered_cache in ((mine, tmp_path / "fresh.h5"), (tmp_path / "fresh", my_file)):
        with pytest.raises(DpokitError, match="refusing to replace"):
            run_audit(
                AuditOptions(
                    cache=str(planted["cache"]),
                    write_filtered=str(write_filtered),
                    drop=["identical"],
                    filtered_cache=str(filtered_cache),
                    out=str(tmp_path / "audit"),
                    overwrite=True,
                ),
                Console(file=io.StringIO()),
            )
    assert (mine / "notes.txt").read_text() == "keep" and my_file.read_text() == "my file"


def test_a_per_token_cache_keeps_each_kept_rows_token_values(tmp_path):
    from dpokit.reference.cache import RefCacheWriter, cache_attrs, create_or_resume_cache, open_cache, subset_cache

    attrs = cache_attrs(
        model="/m",
        weights="w",
        adapter=None,
        adapter_weights=None,
        prepared_path="/p",
        data_fingerprint="d",
        tokenizer_fingerprint="t",
        dtype="float32",
        per_token=True,
    )
    chosen, rejected = np.array([2, 1, 3]), np.array([1, 2, 1])
    create_or_resume_cache(tmp_path / "ref.h5", attrs, {"train": 3}, False, {"train": chosen + rejected})
    tokens = [np.arange(n, dtype=np.float32) + 10 * row for row, n in enumerate(chosen + rejected)]
    logps = -np.arange(3, dtype=np.float32)
    RefCacheWriter(tmp_path / "ref.h5").write(
        "train", np.arange(3), logps, logps - 1, chosen, rejected, token_logps=tokens
    )
    subset = subset_cache(
        open_cache(tmp_path / "ref.h5"),
        {"train": np.array([0, 2])},
        tmp_path / "kept.h5",
        dict(attrs, data_fingerprint="e"),
    )
    got = subset.logps("train")
    assert got.chosen_logps.tolist() == [0.0, -2.0] and got.rejected_tokens.tolist() == [1, 1]
    assert got.token_offsets.tolist() == [0, 3, 7]
    np.testing.assert_array_equal(got.token_logps.numpy(), np.concatenate([tokens[0], tokens[2]]))
    assert subset.attrs["data_fingerprint"] == "e" and subset.is_complete("train")
