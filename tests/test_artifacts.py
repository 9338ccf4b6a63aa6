"""`dpokit.artifacts`: only dpokit's own outputs are replaced, never a command's inputs, never half-written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

from dpokit import __version__
from dpokit.artifacts import (
    MARKER_NAME,
    check_replaceable,
    ejected_header,
    is_dpokit_artifact,
    read_marker,
    remove_stale_siblings,
    remove_within,
    replace_atomically,
    write_marker,
)
from dpokit.errors import DpokitError

REPO = Path(__file__).resolve().parents[1]


def export_dir(path: Path, content: str) -> Path:
    """A directory dpokit marked as an export, holding `weights.txt` with `content`."""
    path.mkdir(parents=True)
    (path / "weights.txt").write_text(content)
    write_marker(path, "export")
    return path


def write_weights(content: str):
    def write(tmp: Path) -> None:
        tmp.mkdir()
        (tmp / "weights.txt").write_text(content)

    return write


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


# ----------------------------------------------------------------------------------------------
# recognising


def test_write_marker_records_kind_version_and_time(tmp_path):
    write_marker(tmp_path, "run")
    record = json.loads((tmp_path / MARKER_NAME).read_text())
    assert record["kind"] == "run" and record["dpokit_version"] == __version__
    assert record["created"].endswith("+00:00")
    assert read_marker(tmp_path) == record
    assert is_dpokit_artifact(tmp_path, "run")
    assert not is_dpokit_artifact(tmp_path, "export")


def test_a_directory_without_a_marker_is_not_dpokits(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    assert not is_dpokit_artifact(tmp_path, "export")
    (tmp_path / MARKER_NAME).write_text("not json")
    assert not is_dpokit_artifact(tmp_path, "export")


def test_a_folder_laid_out_as_prepared_data_is_not_dpokits_without_the_marker(tmp_path):
    folder = tmp_path / "prepared"
    (folder / "train").mkdir(parents=True)
    manifest = {"format_version": 1, "data_fingerprint": "ab" * 32, "splits": {"train": {}}}  # as prepare writes one
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert not is_dpokit_artifact(folder, "prepared")


def test_a_reference_cache_is_an_hdf5_file_with_dpokits_root_attributes(tmp_path):
    cache, other_h5, text = tmp_path / "ref.h5", tmp_path / "other.h5", tmp_path / "ref.txt"
    with h5py.File(cache, "w") as handle:
        handle.attrs["format_version"] = 1
        handle.attrs["data_fingerprint"] = "ab" * 32
    with h5py.File(other_h5, "w") as handle:
        handle.attrs["experiment"] = "mine"
    text.write_text("format_version data_fingerprint")
    assert is_dpokit_artifact(cache, "cache")
    assert not is_dpokit_artifact(other_h5, "cache")
    assert not is_dpokit_artifact(text, "cache")
    assert not is_dpokit_artifact(tmp_path, "cache")


def test_an_ejected_file_is_told_by_its_first_line(tmp_path):
    ejected, edited_below, users = tmp_path / "a.py", tmp_path / "b.py", tmp_path / "c.py"
    ejected.write_text(ejected_header(Path("dpo.py")) + "print('recipe')\n")
    edited_below.write_text(ejected_header(Path("dpo.py")) + "print('my edits')\n")
    users.write_text("print('mine')\n# Ejected by dpokit\n")
    assert ejected.read_text().startswith(f"# Ejected by dpokit {__version__} from dpo.py;")
    assert is_dpokit_artifact(ejected, "ejected") and is_dpokit_artifact(edited_below, "ejected")
    assert not is_dpokit_artifact(users, "ejected")


# ----------------------------------------------------------------------------------------------
# checking before the work


def test_an_absent_target_or_an_empty_directory_may_be_written(tmp_path):
    check_replaceable(tmp_path / "new", "export", overwrite=False)
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", "export", overwrite=False)


def test_an_unmarked_directory_is_refused_even_with_overwrite(tmp_path):
    out = tmp_path / "mywork"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DpokitError) as error:
        check_replaceable(out, "export", overwrite=True)
    assert str(error.value) == (
        f"refusing to replace {out}: it is not a `dpokit export` output (no {MARKER_NAME} marker); "
        "dpokit only replaces what it wrote: choose another --out or remove it yourself"
    )
    assert (out / "notes.txt").read_text() == "keep me"


def test_a_file_where_a_directory_artifact_goes_is_refused(tmp_path):
    (tmp_path / "model").write_text("mine")
    with pytest.raises(DpokitError, match="it is not a directory"):
        check_replaceable(tmp_path / "model", "export", overwrite=True)


def test_an_artifact_of_another_kind_is_refused(tmp_path):
    run = export_dir(tmp_path / "run", "x")
    write_marker(run, "run")
    with pytest.raises(DpokitError, match="marker says it is a dpokit 'run', not 'export'"):
        check_replaceable(run, "export", overwrite=True)


def test_dpokits_own_artifact_is_replaced_only_with_the_flag(tmp_path):
    out = export_dir(tmp_path / "exported", "old")
    with pytest.raises(DpokitError) as error:
        check_replaceable(out, "export", overwrite=False)
    assert str(error.value) == f"{out} already exists; pass --overwrite to replace it, or choose another --out"
    with pytest.raises(DpokitError, match="pass --force to replace it, or choose another destination"):
        check_replaceable(out, "export", overwrite=False, flag="--force", option="destination")
    check_replaceable(out, "export", overwrite=True)


def test_a_target_that_is_or_holds_an_input_is_refused(tmp_path):
    out = export_dir(tmp_path / "exported", "old")
    data = out / "data" / "pairs.jsonl"
    data.parent.mkdir()
    data.write_text("{}\n")
    with pytest.raises(DpokitError) as error:
        check_replaceable(out, "export", overwrite=True, inputs=("hub/model-name", None, data))
    assert str(error.value) == (
        f"--out {out} contains the input {data}; dpokit never replaces what a command reads: choose another --out"
    )
    with pytest.raises(DpokitError, match=f"--out {out} is the input"):
        check_replaceable(out, "export", overwrite=True, inputs=(tmp_path / "exported" / ".." / "exported",))
    check_replaceable(out, "export", overwrite=True, inputs=(tmp_path, "hub/model-name"))  # out inside an input is fine


# ----------------------------------------------------------------------------------------------
# replacing


def test_replace_atomically_puts_the_new_marked_artifact_in_place_and_leaves_no_sibling(tmp_path):
    out = export_dir(tmp_path / "exported", "old")
    assert replace_atomically(out, "export", write_weights("new")) == out
    assert (out / "weights.txt").read_text() == "new"
    assert read_marker(out)["kind"] == "export"
    assert siblings(out) == ["exported"]


def test_replace_atomically_writes_a_file_artifact_with_one_rename(tmp_path):
    out = tmp_path / "recipe.py"
    replace_atomically(out, "ejected", lambda tmp: tmp.write_text(ejected_header(Path("dpo.py")) + "v1\n"))
    replace_atomically(out, "ejected", lambda tmp: tmp.write_text(ejected_header(Path("dpo.py")) + "v2\n"))
    assert out.read_text().endswith("v2\n") and siblings(out) == ["recipe.py"]


def test_a_write_that_fails_midway_leaves_the_old_artifact_and_no_temporary(tmp_path):
    out = export_dir(tmp_path / "exported", "old")

    def write_then_fail(tmp: Path) -> None:
        write_weights("half")(tmp)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        replace_atomically(out, "export", write_then_fail)
    assert (out / "weights.txt").read_text() == "old" and is_dpokit_artifact(out, "export")
    assert siblings(out) == ["exported"]


def test_replace_atomically_refuses_an_unmarked_target_even_when_the_caller_did_not_check(tmp_path):
    out = tmp_path / "mywork"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DpokitError, match="refusing to replace"):
        replace_atomically(out, "export", write_weights("new"))
    assert (out / "notes.txt").read_text() == "keep me" and siblings(out) == ["mywork"]


KILL_MIDWAY = """
import os, signal, sys
from pathlib import Path
from dpokit.artifacts import replace_atomically

def write(tmp):
    tmp.mkdir()
    (tmp / "weights.txt").write_text("half")
    os.kill(os.getpid(), signal.SIGKILL)

replace_atomically(Path(sys.argv[1]), "export", write)
"""


def test_a_process_killed_midway_leaves_the_old_artifact_and_the_next_write_sweeps_its_temporary(tmp_path):
    out = export_dir(tmp_path / "exported", "old")
    killed = subprocess.Popen([sys.executable, "-c", KILL_MIDWAY, str(out)], cwd=REPO)
    assert killed.wait() == -9
    assert (out / "weights.txt").read_text() == "old" and is_dpokit_artifact(out, "export")
    assert siblings(out) == [f".exported.tmp-{killed.pid}", "exported"]
    assert not is_dpokit_artifact(tmp_path / f".exported.tmp-{killed.pid}", "export")  # never trusted: no marker
    replace_atomically(out, "export", write_weights("new"))
    assert (out / "weights.txt").read_text() == "new" and siblings(out) == ["exported"]


def test_a_swap_cut_between_its_two_renames_is_undone_before_the_next_check(tmp_path):
    out = export_dir(tmp_path / "exported", "old")
    os.rename(out, tmp_path / f".exported.old-{dead_pid()}")  # the old one renamed away, the new not yet in
    check_replaceable(out, "export", overwrite=True)
    assert (out / "weights.txt").read_text() == "old" and siblings(out) == ["exported"]


def test_only_dpokit_temporaries_of_dead_processes_are_swept(tmp_path):
    target = tmp_path / "prepared"
    dead, live = dead_pid(), os.getppid()
    names = [
        f".prepared.tmp-{dead}",
        f".prepared.old-{dead}",  # dead: swept
        f".prepared.tmp-{live}",
        ".prepared.tmp-mine",
        ".prepared.backup",
        "prepared.tmp-1",  # kept
        f"..prepared.tmp-{dead}.tmp",
    ]
    for name in names:
        (tmp_path / name).mkdir()
    removed = remove_stale_siblings(target)
    assert sorted(p.name for p in removed) == sorted(names[:2])
    assert siblings(target) == sorted(names[2:])


def test_remove_within_deletes_a_runs_own_files(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "step_0000001").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "notes.txt").write_text("mine")
    write_marker(run, "run")
    remove_within(run, "run", [run / "metrics.jsonl", run / "checkpoints" / "step_0000001", run / "absent"])
    assert sorted(p.name for p in run.iterdir()) == [MARKER_NAME, "checkpoints", "notes.txt"]
    assert list((run / "checkpoints").iterdir()) == []


def test_remove_within_refuses_a_directory_dpokit_did_not_create_and_deletes_nothing(tmp_path):
    mine = tmp_path / "mine"
    (mine / "checkpoints" / "step_0000001").mkdir(parents=True)
    (mine / "metrics.jsonl").write_text("my own log\n")
    with pytest.raises(
        DpokitError, match=r"refusing to delete inside .*mine: it is not a dpokit training run directory"
    ):
        remove_within(mine, "run", [mine / "metrics.jsonl", mine / "checkpoints" / "step_0000001"])
    assert (mine / "metrics.jsonl").read_text() == "my own log\n"
    assert (mine / "checkpoints" / "step_0000001").is_dir()


def test_remove_within_refuses_a_path_outside_the_artifact(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "elsewhere.txt"
    run.mkdir()
    write_marker(run, "run")
    outside.write_text("keep")
    with pytest.raises(DpokitError, match="is not inside the dpokit run"):
        remove_within(run, "run", [run / ".." / "elsewhere.txt"])
    assert outside.read_text() == "keep"


def test_a_checkpoint_is_not_saved_into_a_directory_dpokit_did_not_create(tmp_path):
    from dpokit.checkpoint import save_checkpoint

    mine = tmp_path / "mine"
    (mine / "checkpoints" / "step_0000001").mkdir(parents=True)
    (mine / "checkpoints" / "step_0000001" / "weights.bin").write_text("my weights")
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(DpokitError, match="refusing to write inside"):
        save_checkpoint(mine, 1, model, optimizer, {"step": 1}, adapters=False)
    assert (mine / "checkpoints" / "step_0000001" / "weights.bin").read_text() == "my weights"


def test_writing_inside_a_run_refuses_a_folder_dpokit_did_not_create_and_a_path_outside_it(tmp_path):
    from dpokit.artifacts import write_text_within

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.jsonl").write_text("my numbers\n")
    with pytest.raises(DpokitError, match="refusing to write inside .*mine: it is not a dpokit training run directory"):
        write_text_within(mine, "run", mine / "metrics.jsonl", "replaced\n")
    assert (mine / "metrics.jsonl").read_text() == "my numbers\n"
    assert sorted(p.name for p in mine.iterdir()) == ["metrics.jsonl"]  # no temporary left behind

    run = tmp_path / "run"
    run.mkdir()
    write_marker(run, "run")
    (tmp_path / "elsewhere.txt").write_text("keep")
    with pytest.raises(DpokitError, match="is not inside the dpokit run"):
        write_text_within(run, "run", run / ".." / "elsewhere.txt", "replaced")
    assert (tmp_path / "elsewhere.txt").read_text() == "keep"
    write_text_within(run, "run", run / "metrics.jsonl", "ours\n")  # inside its own run it replaces
    assert (run / "metrics.jsonl").read_text() == "ours\n"
