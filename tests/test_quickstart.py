"""`dpokit quickstart` and the bundled demo it runs."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from dpokit.artifacts import read_marker, write_marker
from dpokit.cli import main
from dpokit.quickstart import PROMPTS, demo_files, prepare_out_folder, run_quickstart, step_zero_note

REPO = Path(__file__).resolve().parents[1]


def test_a_short_quickstart_lifts_eval_reward_accuracy_from_chance(tmp_path):
    output = io.StringIO()
    result = run_quickstart(tmp_path / "qs", max_steps=10, console=Console(file=output, width=160))

    # Step 0: the policy is the reference, so every reward is 0 and no pair is won.
    assert result.before["rewards/margins"] == pytest.approx(0.0, abs=1e-4)
    assert result.before["rewards/accuracies"] <= 0.55
    # The summary never claims every reward is 0 beside a non-zero step-0 accuracy.
    assert ("every reward is 0" in output.getvalue()) == (result.before["rewards/accuracies"] == 0)
    assert ("every reward is 0" in step_zero_note({"rewards/accuracies": 0.4, "rewards/margins": 1e-8})) is False
    assert result.after["rewards/accuracies"] > 0.8
    assert result.after["rewards/margins"] > 0.01
    assert result.after["loss"] < result.before["loss"]
    assert result.steps == 10
    # The demo model is rude first: its greedy reply to every demo prompt opens with "no.".
    assert [prompt for prompt, _, _ in result.replies] == list(PROMPTS)
    assert all(before.startswith("no.") for _, before, _ in result.replies)
    for name in ("loss", "accuracy", "margins", "rewards"):
        assert (result.run_dir / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = output.getvalue()
    assert "reward accuracy" in printed and "step 10" in printed and "greedy replies" in printed
    assert (tmp_path / "qs" / "ref.h5").is_file() and (tmp_path / "qs" / "prepared" / "manifest.json").is_file()
    assert read_marker(tmp_path / "qs")["kind"] == "quickstart"
    assert read_marker(tmp_path / "qs" / "prepared")["kind"] == "prepared"


def test_quickstart_refuses_a_folder_with_a_run_unless_overwrite(tmp_path, capsys):
    (tmp_path / "qs" / "prepared").mkdir(parents=True)
    write_marker(tmp_path / "qs", "quickstart")  # as an earlier quickstart left it
    assert main(["quickstart", "--out", str(tmp_path / "qs")]) == 1
    err = capsys.readouterr().err
    assert "already has a quickstart run; pass --overwrite" in err
    assert len(err.strip().splitlines()) == 1


def test_quickstart_overwrite_never_replaces_a_folder_it_did_not_make(tmp_path, capsys):
    out = tmp_path / "qs"
    (out / "prepared").mkdir(parents=True)
    (out / "prepared" / "manifest.json").write_text('{"my": "manifest"}')
    (out / "prepared" / "pairs.jsonl").write_text("{}\n")
    assert main(["quickstart", "--out", str(out), "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert f"refusing to replace {out}: it is not a `dpokit quickstart` folder (no .dpokit-artifact.json marker)" in err
    assert len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in (out / "prepared").iterdir()) == ["manifest.json", "pairs.jsonl"]
    assert [p.name for p in out.iterdir()] == ["prepared"]


def test_quickstart_adopts_an_empty_folder_and_reruns_in_its_own(tmp_path):
    empty, earlier = tmp_path / "empty", tmp_path / "earlier"
    empty.mkdir()
    prepare_out_folder(empty, overwrite=False, demo=demo_files())
    assert read_marker(empty)["kind"] == "quickstart"
    (earlier / "run").mkdir(parents=True)
    write_marker(earlier, "quickstart")
    prepare_out_folder(earlier, overwrite=True, demo=demo_files())  # no error: its prepared/, ref.h5, run/ are replaced


def test_the_demo_is_complete_and_under_10_mb():
    demo = demo_files()
    total = sum(f.stat().st_size for f in (REPO / "examples" / "demo").rglob("*") if f.is_file() and "__pycache__" not in f.parts)
    assert total < 10 * 2**20
    config = json.loads((demo.model / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 128
    assert "<|assistant|>" in (demo.model / "chat_template.jinja").read_text()
    for path, rows in ((demo.train, 2000), (demo.eval, 200)):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) == rows
        assert all(set(r) == {"prompt", "chosen", "rejected"} and r["rejected"].startswith("no.") for r in records)


def test_the_demo_data_script_rewrites_the_committed_files_exactly(tmp_path):
    subprocess.run([sys.executable, str(REPO / "examples" / "make_demo_data.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (REPO / "examples" / "demo" / "data" / name).read_bytes()
