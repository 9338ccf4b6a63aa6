"""`dpokit quickstart` and the bundled demo it runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dpokit.artifacts import read_marker, write_marker
from dpokit.cli import main
from dpokit.quickstart import demo_files, prepare_out_folder, step_zero_note

REPO = Path(__file__).resolve().parents[1]


# The whole quickstart runs once, as a user runs it after `pip install dpokit`:
# tests/test_eject.py::test_the_wheel_without_extras_runs_the_quickstart_to_the_end (eval accuracy lifted from chance,
# the rude model's replies before and after, the curves, the markers).


def test_the_step_zero_note_never_claims_every_reward_is_0_beside_a_won_pair():
    assert "every reward is 0" in step_zero_note({"rewards/accuracies": 0.0, "rewards/margins": 0.0})
    assert "every reward is 0" not in step_zero_note({"rewards/accuracies": 0.4, "rewards/margins": 1e-8})


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
    total = sum(
        f.stat().st_size
        for f in (REPO / "examples" / "demo").rglob("*")
        if f.is_file() and "__pycache__" not in f.parts
    )
    assert total < 10 * 2**20
    config = json.loads((demo.model / "config.json").read_text())
    assert config["model_type"] == "llama" and config["hidden_size"] == 128
    assert "<|assistant|>" in (demo.model / "chat_template.jinja").read_text()
    for path, rows in ((demo.train, 2000), (demo.eval, 200)):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(records) == rows
        assert all(set(r) == {"prompt", "chosen", "rejected"} and r["rejected"].startswith("no.") for r in records)


def test_the_demo_data_script_rewrites_the_committed_files_exactly(tmp_path):
    subprocess.run(
        [sys.executable, str(REPO / "examples" / "make_demo_data.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_bytes() == (REPO / "examples" / "demo" / "data" / name).read_bytes()
