"""Log levels: `--log-level`, `DPOKIT_LOG_LEVEL` and `--debug` choose what a command prints."""

from __future__ import annotations

import json

import pytest

from dpokit import log
from dpokit.cli import main


def prepare(args, data, model, out):
    return main([*args, "prepare", str(data), "--model", str(model), "--out", str(out)])


def test_info_is_the_default_and_warning_keeps_only_notes(pairs_jsonl, tokenizer_dir, tmp_path, capsys, monkeypatch):
    assert prepare([], pairs_jsonl, tokenizer_dir, tmp_path / "a") == 0
    assert "rows read" in capsys.readouterr().out  # the summary table, as it always was
    assert prepare(["--log-level", "warning"], pairs_jsonl, tokenizer_dir, tmp_path / "b") == 0
    assert capsys.readouterr().out == ""
    log.set_level("warning")
    log.note("a fallback was taken")
    assert "note: a fallback was taken" in capsys.readouterr().err
    log.set_level("error")
    log.note("hidden")
    assert capsys.readouterr().err == ""


def test_the_level_is_in_the_environment_while_the_command_runs_and_put_back_after(monkeypatch, capsys):
    seen = {}
    import dpokit.config

    monkeypatch.setattr(dpokit.config, "shipped_config_names", lambda: [seen.setdefault("level", log.level_name())])
    assert main(["--log-level=debug", "config", "list"]) == 0
    assert seen["level"] == "debug" and capsys.readouterr().out.strip() == "debug"
    assert log.level_name() == "info"  # put back afterwards


def test_debug_shows_the_cause_under_the_one_line_error(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert main(["plan", "--model", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main(["--debug", "plan", "--model", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "JSONDecodeError" in err  # the original exception, kept as the cause
    assert "The above exception was the direct cause" in err


@pytest.mark.parametrize(
    "args, env, message",
    [
        (
            ["--log-level", "loud"],
            None,
            "--log-level 'loud' is not a log level; choose one of: debug, info, warning, error",
        ),
        ([], "chatty", "DPOKIT_LOG_LEVEL='chatty' is not a log level"),
    ],
)
def test_a_bad_level_is_one_line(args, env, message, monkeypatch, capsys):
    if env:
        monkeypatch.setenv(log.ENV, env)
    assert main([*args, "config", "list"]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_the_manifest_is_the_same_at_every_level(pairs_jsonl, tokenizer_dir, tmp_path):
    assert prepare(["--log-level", "error"], pairs_jsonl, tokenizer_dir, tmp_path / "quiet") == 0
    assert prepare(["--debug"], pairs_jsonl, tokenizer_dir, tmp_path / "loud") == 0
    quiet, loud = (json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("quiet", "loud"))
    assert quiet["data_fingerprint"] == loud["data_fingerprint"]
