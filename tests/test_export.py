"""`dpokit export`: writes a standalone model through a temporary sibling, and never replaces
what it did not write (a folder of the user's, the run being exported)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dpokit.artifacts import read_marker
from dpokit.checkpoint import latest_checkpoint
from dpokit.cli import main


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, prepared_dir, tmp_path_factory) -> Path:
    """A one-step LoRA run of the tiny model (one checkpoint)."""
    run = tmp_path_factory.mktemp("export") / "run"
    args = [
        f"model.path={tiny_model_dir}",
        f"data.path={prepared_dir}",
        f"output.dir={run}",
        "reference.source=live",
        "training.eval_every=0",
        "training.max_steps=1",
    ]
    assert main(["train", "--config", "tiny_lora", *args]) == 0
    return run


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def export(run: Path, out: Path, *flags: str) -> int:
    return main(["export", str(run), "--out", str(out), *flags])


def test_export_merges_the_adapter_into_a_marked_model_directory(lora_run, tmp_path):
    out = tmp_path / "exported"
    assert export(lora_run, out) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "adapter_config.json").exists()
    assert read_marker(out)["kind"] == "export"
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]


def test_export_no_merge_copies_the_adapter_without_training_state(lora_run, tmp_path):
    out = tmp_path / "adapter"
    assert export(lora_run, out, "--no-merge") == 0
    assert (out / "adapter_config.json").is_file() and read_marker(out)["kind"] == "export"
    assert set(tree(out)) - {".dpokit-artifact.json"} < set(tree(latest_checkpoint(lora_run)))


@pytest.mark.parametrize("flags", [[], ["--overwrite"]], ids=["plain", "overwrite"])
def test_export_onto_a_folder_of_unrelated_files_keeps_them(lora_run, tmp_path, capsys, flags):
    out = tmp_path / "mywork"
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "thesis.tex").write_text("months of work")
    before = tree(out)
    assert export(lora_run, out, *flags) == 1
    err = capsys.readouterr().err
    assert f"refusing to replace {out}: it is not a `dpokit export` output (no .dpokit-artifact.json marker)" in err
    assert len(err.strip().splitlines()) == 1
    assert tree(out) == before and [p.name for p in tmp_path.iterdir()] == ["mywork"]


def test_exporting_into_the_runs_own_directory_is_refused_and_the_run_is_intact(lora_run, capsys):
    before = tree(lora_run)
    assert export(lora_run, lora_run) == 1
    err = capsys.readouterr().err
    assert f"--out {lora_run} is the input {lora_run}; dpokit never replaces what a command reads" in err
    assert len(err.strip().splitlines()) == 1
    assert tree(lora_run) == before
    assert export(lora_run, lora_run.parent, "--overwrite") == 1  # a folder that holds the run
    assert f"--out {lora_run.parent} contains the input {lora_run}" in capsys.readouterr().err
    assert tree(lora_run) == before


def test_an_earlier_export_is_replaced_only_with_overwrite(lora_run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert export(lora_run, out, "--no-merge") == 0
    assert export(lora_run, out) == 1
    assert f"{out} already exists; pass --overwrite to replace it, or choose another --out" in capsys.readouterr().err
    assert (out / "adapter_config.json").is_file()
    assert export(lora_run, out, "--overwrite") == 0  # now the merged model in its place
    assert (out / "model.safetensors").is_file() and not (out / "adapter_config.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]


def test_overwrite_keeps_a_file_someone_added_to_an_export(lora_run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert export(lora_run, out) == 0
    (out / "MY_EVAL.md").write_text("results")
    assert export(lora_run, out, "--overwrite") == 1
    assert "it holds MY_EVAL.md, which dpokit did not write there" in capsys.readouterr().err
    assert (out / "MY_EVAL.md").read_text() == "results"


def test_a_missing_base_model_folder_is_one_line(lora_run, tmp_path, capsys):
    assert export(lora_run, tmp_path / "exported", "--base-model", str(tmp_path / "nonexistent")) == 1
    err = capsys.readouterr().err.strip()
    assert "nonexistent: no config.json there" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "exported").exists()
