"""Bad input meets one clear error line naming the file, row, key or flag and the fix (issue 13's tail)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import train_cli_args

from dpokit.cli import main
from dpokit.data.prepared import MANIFEST_NAME, load_prepared, split_file_digests
from dpokit.metrics import read_metrics


def error_line(capsys) -> str:
    """The one stderr line of a failed command (no traceback)."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def prepare(data, model, out, *flags):
    return main(["prepare", str(data), "--model", str(model), "--out", str(out), *map(str, flags)])


def train_args(model_dir, data_dir, run_dir, *extra) -> list[str]:
    return [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data_dir),
        "--out",
        str(run_dir),
        "--ref",
        "live",
        "training.eval_every=0",
        *extra,
    ]


# ----------------------------------------------------------------------------------------------
# prepare: encodings and the output directory


LATIN1_ROW = '{"prompt": "caf\xe9?", "chosen": "yes", "rejected": "no"}'


@pytest.mark.parametrize(
    "suffix, content, line, column",
    [
        (".jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n\n' + LATIN1_ROW + "\n", 3, 16),
        (".json", '[\n{"prompt": "a", "chosen": "b", "rejected": "c"},\n' + LATIN1_ROW + "\n]", 3, 16),
        (".csv", "prompt,chosen,rejected\na,b,c\ncaf\xe9?,yes,no\n", 3, 4),
    ],
)
def test_non_utf8_input_names_the_file_line_and_byte(suffix, content, line, column, tokenizer_dir, tmp_path, capsys):
    data = tmp_path / f"pairs{suffix}"
    data.write_bytes(content.encode("latin-1"))
    assert prepare(data, tokenizer_dir, tmp_path / "prepared") == 1
    assert error_line(capsys) == (
        f"error: {data} line {line}: not UTF-8 text (byte 0xe9 at column {column}); convert the file to UTF-8 "
        "(for example `iconv -f cp1252 -t utf-8 IN > OUT`, with the file's actual encoding)"
    )
    assert not (tmp_path / "prepared").exists()


def unwritable_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create entries in: mode 0555, or /sys for root (who ignores modes)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            Path(tempfile.mkdtemp(dir=candidate)).rmdir()
        except OSError:
            return candidate
    pytest.skip("no directory here refuses writes")


def refuse_tokenizer(monkeypatch) -> None:
    def load_tokenizer(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded before the output directory was checked")

    monkeypatch.setattr("dpokit.data.pipeline.load_tokenizer", load_tokenizer)


def test_read_only_out_is_refused_before_tokenizing(pairs_jsonl, tokenizer_dir, tmp_path, capsys, monkeypatch):
    refuse_tokenizer(monkeypatch)
    parent = unwritable_dir(tmp_path)
    out = parent / "dpokit-prepared"
    assert prepare(pairs_jsonl, tokenizer_dir, out) == 1
    err = error_line(capsys)
    assert err.startswith(f"error: cannot write --out {out}: {parent} is not writable (")
    assert err.endswith("); choose a writable --out or fix the directory's permissions")
    assert not out.exists()


def test_out_below_a_file_is_refused_before_tokenizing(pairs_jsonl, tokenizer_dir, tmp_path, capsys, monkeypatch):
    refuse_tokenizer(monkeypatch)
    (tmp_path / "notes.txt").write_text("keep me")
    out = tmp_path / "notes.txt" / "runs" / "prepared"
    assert prepare(pairs_jsonl, tokenizer_dir, out) == 1
    assert error_line(capsys) == (
        f"error: cannot write --out {out}: {tmp_path / 'notes.txt'} is a file, not a directory; choose another --out"
    )
    assert (tmp_path / "notes.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------------------------
# --gpus


@pytest.mark.parametrize("gpus", [0, -1])
def test_gpus_below_one_is_refused_by_ref_logps(gpus, tiny_model_dir, prepared_dir, tmp_path, capsys):
    out = tmp_path / "ref.h5"
    assert (
        main(["ref-logps", str(prepared_dir), "--model", str(tiny_model_dir), "--out", str(out), "--gpus", str(gpus)])
        == 1
    )
    assert error_line(capsys) == (
        f"error: --gpus must be at least 1, got {gpus} (the processes to launch, one per GPU; 1 runs in this process)"
    )
    assert not out.exists()


@pytest.mark.parametrize("gpus", [0, -1])
def test_gpus_below_one_is_refused_by_train(gpus, tiny_model_dir, prepared_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_model_dir, prepared_dir, run, "--max-steps", "1", "--gpus", str(gpus))) == 1
    assert f"--gpus must be at least 1, got {gpus}" in error_line(capsys)
    assert not run.exists()


# ----------------------------------------------------------------------------------------------
# prepared/ checked when opened


ARROW = "train/data-00000-of-00001.arrow"


def damaged_copy(prepared_dir: Path, out: Path, damage) -> Path:
    """A copy of prepared/ (its manifest records the split files' digests), then `damage(arrow file)`."""
    shutil.copytree(prepared_dir, out)
    damage(out / ARROW)
    return out


def truncate_half(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def change_one_token(file: Path) -> None:
    """Add 1 to the last chosen token of row 0 in place: same size, still a valid Arrow file."""
    import pyarrow as pa

    with pa.memory_map(str(file)) as source:
        table = pa.ipc.open_stream(source).read_all()
    dtype = np.dtype(table.schema.field("chosen_ids").type.value_type.to_pandas_dtype()).newbyteorder("<")
    ids = table.column("chosen_ids")[0].as_py()
    old, new = np.asarray(ids, dtype).tobytes(), np.asarray(ids[:-1] + [ids[-1] + 1], dtype).tobytes()
    data = file.read_bytes()
    assert data.count(old) >= 1
    file.write_bytes(data.replace(old, new, 1))


def remake_hint(prepared: Path) -> str:
    manifest = json.loads((prepared / MANIFEST_NAME).read_text())
    return (
        f"re-create it with `dpokit prepare {manifest['source']} --model {manifest['tokenizer']['name']} "
        f"--out {prepared} --overwrite` (and its other options)"
    )


def test_a_manifest_without_split_file_digests_is_refused(tiny_model_dir, prepared_dir, tmp_path, capsys):
    copy = shutil.copytree(prepared_dir, tmp_path / "prepared")
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    del manifest["files"]
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    assert main(["ref-logps", str(copy), "--model", str(tiny_model_dir), "--out", str(tmp_path / "ref.h5")]) == 1
    assert error_line(capsys) == f"error: {copy / MANIFEST_NAME} records no split files; {remake_hint(copy)}"
    assert not (tmp_path / "ref.h5").exists()


def test_recorded_digests_pass_intact_files_and_name_a_truncated_one(tiny_model_dir, prepared_dir, tmp_path, capsys):
    size = (prepared_dir / ARROW).stat().st_size
    intact = damaged_copy(prepared_dir, tmp_path / "intact", lambda file: None)
    digests = json.loads((intact / MANIFEST_NAME).read_text())["files"]
    assert set(digests) >= {ARROW, "train/state.json", "eval/data-00000-of-00001.arrow"}
    assert digests[ARROW]["size"] == size and digests == split_file_digests(intact)
    assert len(load_prepared(intact).split("train")) == 32

    damaged = damaged_copy(prepared_dir, tmp_path / "prepared", truncate_half)
    assert main(["ref-logps", str(damaged), "--model", str(tiny_model_dir), "--out", str(tmp_path / "ref.h5")]) == 1
    assert error_line(capsys) == (
        f"error: {damaged / ARROW} is {size // 2} bytes but `dpokit prepare` wrote {size} (truncated or changed since); "
        f"{remake_hint(damaged)}"
    )


def test_recorded_hashes_name_a_changed_file(tiny_model_dir, prepared_dir, tmp_path, capsys):
    damaged = damaged_copy(prepared_dir, tmp_path / "prepared", change_one_token)
    assert main(train_args(tiny_model_dir, damaged, tmp_path / "run", "--max-steps", "1")) == 1
    assert error_line(capsys) == (
        f"error: {damaged / ARROW} has changed since `dpokit prepare` wrote it; {remake_hint(damaged)}"
    )


# ----------------------------------------------------------------------------------------------
# numeric settings: ranges in the config layer, loss parameters where losses are built


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "-1e-5"], "optimizer.lr=-1e-05 is out of range; it must be > 0"),
        (["--batch-size", "0"], "data.batch_size=0 is out of range; it must be >= 1"),
        (
            ["training.gradient_accumulation_steps=0"],
            "training.gradient_accumulation_steps=0 is out of range; it must be >= 1",
        ),
        (
            ["--max-steps", "0"],
            "training.max_steps=0 is out of range; it must be >= 1 (or null to run training.epochs epochs)",
        ),
        (
            ["--max-steps", "-2"],
            "training.max_steps=-2 is out of range; it must be >= 1 (or null to run training.epochs epochs)",
        ),
        (["--epochs", "0"], "training.epochs=0 is out of range; it must be >= 1"),
    ],
)
def test_train_flags_out_of_range_are_one_line_naming_the_key(
    flags, message, tiny_model_dir, prepared_dir, tmp_path, capsys
):
    run = tmp_path / "run"
    assert main(train_args(tiny_model_dir, prepared_dir, run, *flags)) == 1
    assert error_line(capsys) == f"error: {message}"
    assert not run.exists()


@pytest.mark.parametrize(
    "key, edge, past, refused",
    [
        ("lora.rank", "1", "0", "lora.rank=0 is out of range; it must be >= 1"),
        ("lora.alpha", "0.5", "0", "lora.alpha=0.0 is out of range; it must be > 0"),
        ("lora.dropout", "0", "1", "lora.dropout=1.0 is out of range; it must be in [0, 1)"),
        (
            "data.pack_length",
            "null",
            "0",
            "data.pack_length=0 is out of range; it must be >= 1 (or null for the batch's longest sequence)",
        ),
        (
            "data.logps_chunk_size",
            "1",
            "0",
            "data.logps_chunk_size=0 is out of range; it must be >= 1 (or null for as many "
            "positions as fit the device's byte budget (dpokit.logps.CHUNK_BYTES))",
        ),
        ("optimizer.weight_decay", "0", "-0.1", "optimizer.weight_decay=-0.1 is out of range; it must be >= 0"),
        ("optimizer.eps", "1.0e-12", "0", "optimizer.eps=0.0 is out of range; it must be > 0"),
        ("scheduler.warmup_steps", "0", "-1", "scheduler.warmup_steps=-1 is out of range; it must be >= 0"),
        ("scheduler.min_lr_ratio", "1", "1.5", "scheduler.min_lr_ratio=1.5 is out of range; it must be in [0, 1]"),
        (
            "training.max_grad_norm",
            "null",
            "0",
            "training.max_grad_norm=0.0 is out of range; it must be > 0 (or null for no clipping)",
        ),
        ("training.eval_every", "0", "-1", "training.eval_every=-1 is out of range; it must be >= 0"),
        (
            "training.eval_batches",
            "1",
            "0",
            "training.eval_batches=0 is out of range; it must be >= 1 (or null for the whole split)",
        ),
        ("training.save_every", "0", "-5", "training.save_every=-5 is out of range; it must be >= 0"),
        ("training.keep_last", "1", "0", "training.keep_last=0 is out of range; it must be >= 1"),
        ("training.log_every", "1", "0", "training.log_every=0 is out of range; it must be >= 1"),
    ],
)
def test_config_ranges_accept_the_edge_and_refuse_past_it(key, edge, past, refused, capsys):
    assert main(["config", "show", "tiny_lora", f"{key}={edge}"]) == 0
    section, name = key.split(".")
    assert yaml.safe_load(capsys.readouterr().out)[section][name] == yaml.safe_load(edge)
    assert main(["config", "show", "tiny_lora", f"{key}={past}"]) == 1
    assert error_line(capsys) == f"error: {refused}"  # an override: no file named


@pytest.mark.parametrize(
    "setting, refused",
    [
        ("optimizer.lr=.inf", "optimizer.lr=inf is out of range; it must be > 0"),
        ("lora.alpha=.inf", "lora.alpha=inf is out of range; it must be > 0"),
        ("training.max_grad_norm=-.inf", "training.max_grad_norm=-inf is out of range; it must be > 0"),
    ],
)
def test_infinite_settings_are_out_of_every_range(setting, refused, capsys):
    assert main(["config", "show", "tiny_lora", setting]) == 1
    assert refused in error_line(capsys)


@pytest.mark.parametrize(
    "betas, message",
    [
        ("[0.9,1.0]", "optimizer.betas[1]=1.0 is out of range; it must be in [0, 1)"),
        ("[-0.1,0.999]", "optimizer.betas[0]=-0.1 is out of range; it must be in [0, 1)"),
        ("[0.9]", "optimizer.betas must have 2 values, got [0.9]"),
    ],
)
def test_optimizer_betas_are_two_values_in_0_1(betas, message, capsys):
    assert main(["config", "show", "tiny_lora", f"optimizer.betas={betas}"]) == 1
    assert error_line(capsys) == f"error: {message}"


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--beta", "0"],
            "loss.beta=0.0 is out of range; it must be > 0 (0 learns nothing, and a negative beta prefers the rejected responses)",
        ),
        (
            ["--beta", "-0.1"],
            "loss.beta=-0.1 is out of range; it must be > 0 (0 learns nothing, and a negative beta prefers the rejected responses)",
        ),
        (
            ["--loss", "rso", "--gamma", "0"],
            "loss.gamma=0.0 is out of range; it must be > 0 (it scales the margin: 0 gives a constant loss, a negative gamma prefers the rejected responses)",
        ),
        (
            ["--loss", "hinge", "--gamma", "-1"],
            "loss.gamma=-1.0 is out of range; it must be > 0 (it scales the margin: 0 gives a constant loss, a negative gamma prefers the rejected responses)",
        ),
        (
            ["--loss", "simpo", "--beta", "-2"],
            "loss.beta=-2.0 is out of range; it must be > 0 (0 learns nothing, and a negative beta prefers the rejected responses)",
        ),
        (
            ["--loss", "simpo", "--gamma", "-0.5"],
            "loss.gamma=-0.5 is out of range; it must be >= 0 (it is the target reward margin)",
        ),
        (["loss.sft_weight=-1"], "loss.sft_weight=-1.0 is out of range; it must be >= 0"),
        (["loss.beta=big"], "loss.beta must be a number, got 'big'"),
    ],
)
def test_loss_parameters_out_of_range_are_one_line(flags, message, tiny_model_dir, prepared_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_model_dir, prepared_dir, run, "--max-steps", "1", *flags)) == 1
    assert error_line(capsys) == f"error: {message}"
    assert not (run / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# metrics.jsonl with a torn last line


def write_run_metrics(run: Path, text: str) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text(text)
    return run


RECORDS = "".join(json.dumps({"step": s, "split": "train", "loss": 0.7 - s / 10}) + "\n" for s in (1, 2))
TORN = '{"step": 3, "split": "train", "lo'


def test_plot_skips_a_torn_last_line(tmp_path):
    run = write_run_metrics(tmp_path / "run", RECORDS + TORN)
    assert main(["plot", str(run)]) == 0
    assert [(r["step"], r["loss"]) for r in read_metrics(run)] == [(1, pytest.approx(0.6)), (2, pytest.approx(0.5))]
    assert (run / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_names_a_corrupt_line_in_the_middle(tmp_path, capsys):
    lines = RECORDS.splitlines(keepends=True)
    run = write_run_metrics(tmp_path / "run", lines[0] + TORN + "\n" + lines[1])
    assert main(["plot", str(run)]) == 1
    err = error_line(capsys)
    assert err.startswith(f"error: {run / 'metrics.jsonl'} line 2: not valid JSON (")
    assert err.endswith("); delete that line (or restore the file) and run again")


def test_resume_drops_a_torn_last_line_and_continues(tiny_model_dir, prepared_dir, tmp_path):
    run = tmp_path / "run"
    args = train_args(
        tiny_model_dir, prepared_dir, run, "--max-steps", "2", "training.save_every=1", "data.batch_size=8"
    )
    assert main(args) == 0
    # Killed while logging step 2, after the step-1 checkpoint: step 1's record, then half of step 2's.
    shutil.rmtree(run / "checkpoints" / "step_0000002")
    step_1 = [line for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] == 1]
    (run / "metrics.jsonl").write_text("\n".join(step_1) + "\n" + TORN)
    assert main(args + ["--resume"]) == 0
    text = (run / "metrics.jsonl").read_text()
    assert text.endswith("\n") and TORN not in text
    assert [r["step"] for r in read_metrics(run, "train")] == [1, 2]


# ----------------------------------------------------------------------------------------------
# process resources and start-up

THREAD_RECORDING_LOSS = """
import torch
from dpokit.losses import DPOLoss

SEEN = []


class RecordsThreads(DPOLoss):
    def forward(self, policy, reference):
        SEEN.append(torch.get_num_threads())
        return super().forward(policy, reference)
"""


def test_threads_sets_torch_threads_for_a_run_and_restores_them(tiny_model_dir, prepared_dir, tmp_path, monkeypatch):
    import torch

    (tmp_path / "thread_recording_loss.py").write_text(THREAD_RECORDING_LOSS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import thread_recording_loss

    before = torch.get_num_threads()
    args = train_cli_args(
        tiny_model_dir,
        prepared_dir,
        tmp_path / "run",
        "--threads",
        "1",
        "--max-steps",
        "2",
        "--loss",
        "thread_recording_loss:RecordsThreads",
    )
    assert main(args) == 0
    assert thread_recording_loss.SEEN and set(thread_recording_loss.SEEN) == {1}
    assert torch.get_num_threads() == before
    assert (
        main(
            [
                "ref-logps",
                str(prepared_dir),
                "--model",
                str(tiny_model_dir),
                "--out",
                str(tmp_path / "ref.h5"),
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert torch.get_num_threads() == before
    assert main(train_cli_args(tiny_model_dir, prepared_dir, tmp_path / "other", "--threads", "0")) == 1


def test_cache_info_and_help_start_without_torch(ref_cache):
    import subprocess
    import sys

    # As the `dpokit` console script runs them (`dpokit.cli.entry`), `python -m dpokit` included.
    code = (
        "import sys; from dpokit.cli import entry; sys.argv = ['dpokit', *sys.argv[1:]]\n"
        "try:\n    entry()\nexcept SystemExit as stop:\n    code = stop.code\n"
        "assert 'torch' not in sys.modules, 'imported torch'; sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", code, "cache", "info", str(ref_cache)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "per_token" in done.stdout and "complete" in done.stdout
    done = subprocess.run([sys.executable, "-c", code, "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "quickstart" in done.stdout, done.stderr


def test_the_dpokit_command_gives_torch_huge_pages_and_keeps_a_users_own_settings():
    import os
    import subprocess
    import sys

    from dpokit.host_memory import HUGE_PAGES, MMAP_THRESHOLD, add_host_memory_settings

    # The console script sets both before torch is imported; torch then asks the kernel for huge pages
    # (madvise: "hg" among the flags of the mapping that holds a large CPU tensor).
    code = (
        "import os, sys; from dpokit.cli import entry; sys.argv = ['dpokit', '--version']\n"
        "try:\n    entry()\nexcept SystemExit:\n    pass\n"
        "import torch; tensor = torch.empty(8 * 2**20, dtype=torch.uint8); address = tensor.data_ptr(); flags = []\n"
        "for line in open('/proc/self/smaps'):\n"
        "    field = line.split()\n"
        "    if field[0] == 'VmFlags:' and inside:\n        flags = field[1:]\n"
        "    elif '-' in field[0]:\n        low, high = (int(x, 16) for x in field[0].split('-')); inside = low <= address < high\n"
        f"print(os.environ[{HUGE_PAGES!r}], os.environ[{MMAP_THRESHOLD!r}], 'hg' in flags)"
    )
    env = {k: v for k, v in os.environ.items() if k not in (HUGE_PAGES, MMAP_THRESHOLD)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-3:] == ["1", str(4 * 2**20), "True"]
    # A setting the user made wins.
    assert add_host_memory_settings({HUGE_PAGES: "0"}) == {HUGE_PAGES: "0", MMAP_THRESHOLD: str(4 * 2**20)}


def test_missing_matplotlib_is_one_line_and_the_quickstart_still_finishes(tmp_path, monkeypatch, capsys):
    import sys

    from dpokit.quickstart import curves

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # an environment without it
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 0.69}\n')
    assert main(["plot", str(run)]) == 1
    assert (
        error_line(capsys)
        == "error: drawing curves needs matplotlib, a dpokit dependency missing here: pip install matplotlib"
    )
    from rich.console import Console

    console = Console(file=open(tmp_path / "out.txt", "w"), width=200)
    assert curves(run, console) == []
    console.file.close()
    assert "note: no curves: drawing curves needs matplotlib" in capsys.readouterr().err  # a note, on stderr


def test_a_run_names_no_tracker_by_default_and_refuses_a_missing_tensorboard_it_names(
    tiny_model_dir, prepared_dir, tmp_path, monkeypatch, capsys
):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as without the extra
    assert main(train_cli_args(tiny_model_dir, prepared_dir, tmp_path / "run", "--max-steps", "1")) == 0
    out, err = capsys.readouterr()
    assert "tensorboard" not in (out + err).lower() and not (tmp_path / "run" / "tensorboard").exists()
    assert (tmp_path / "run" / "metrics.jsonl").is_file()  # where every value goes
    args = train_cli_args(tiny_model_dir, prepared_dir, tmp_path / "named", "--max-steps", "1")
    assert main([*args, "logging.report_to=tensorboard"]) == 1
    assert (
        "logging.report_to names tensorboard, not installed: pip install 'dpokit[tensorboard]'"
        in capsys.readouterr().err
    )


def test_the_dpokit_command_keeps_bitsandbytes_out_of_runs_that_do_not_use_it(tmp_path, monkeypatch):
    from dpokit.launch import run_recipe

    recipe = tmp_path / "recipe.py"
    recipe.write_text("def main(argv):\n    return argv\n")
    blocked = []
    monkeypatch.setattr("dpokit.model.block_bitsandbytes_import", lambda: blocked.append(True))
    run_recipe(recipe, ["--config", "tiny_lora"])  # in a program that imports dpokit: nothing is blocked
    assert blocked == []
    run_recipe(recipe, ["--config", "tiny_lora", "model.method=qlora"], own_process=True)  # 4-bit weights need it
    run_recipe(recipe, ["--config", "tiny_lora"], own_process=True)  # as the `dpokit` command runs it
    assert blocked == [True]


# ----------------------------------------------------------------------------------------------
# one line, not a traceback, for what a user gets wrong in a path or a value


def test_an_out_under_a_regular_file_is_one_line_for_every_command(tiny_model_dir, prepared_dir, tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("mine")
    assert main(train_args(tiny_model_dir, prepared_dir, blocker / "run", "training.max_steps=1")) == 1
    assert "afile/run: Not a directory; a part of that path is a file, not a folder" in error_line(capsys)
    assert main(["ref-logps", str(prepared_dir), "--model", str(tiny_model_dir), "--out", str(blocker / "ref.h5")]) == 1
    assert "afile: File exists; a file of that name is in the way" in error_line(capsys)
    assert blocker.read_text() == "mine"


@pytest.mark.parametrize(
    "args, message",
    [
        (["cache", "verify", "CACHE", "--sample", "-3"], "--sample must be at least 1 (rows to recompute), got -3"),
        (
            ["cache", "info", "PAIRS"],
            "is not a reference cache (not an HDF5 file); give the file `dpokit ref-logps` wrote",
        ),
    ],
)
def test_cache_commands_refuse_bad_values_in_one_line(args, message, ref_cache, tmp_path, capsys):
    pairs = tmp_path / "train.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    assert main([{"CACHE": str(ref_cache), "PAIRS": str(pairs)}.get(a, a) for a in args]) == 1
    line = error_line(capsys)
    assert message in line and "--overwrite" not in line


def test_a_custom_loss_without_a_module_is_one_line(tiny_model_dir, prepared_dir, tmp_path, capsys):
    assert main(train_args(tiny_model_dir, prepared_dir, tmp_path / "run", "--loss", ":Foo")) == 1
    assert "loss ':Foo': give both the module and the class, as package.module:Class" in error_line(capsys)


def test_auto_dtype_is_bfloat16_only_on_a_gpu_that_computes_in_it(monkeypatch):
    import torch

    from dpokit.errors import DpokitError
    from dpokit.model import resolve_dtype

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert resolve_dtype("auto", cuda) == torch.bfloat16 and resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)  # a V100, a T4
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "Tesla V100-SXM2-16GB")
    assert resolve_dtype("auto", cuda) == torch.float32
    with pytest.raises(DpokitError, match=r"model.dtype=bfloat16: Tesla V100-SXM2-16GB does not compute in bfloat16"):
        resolve_dtype("bfloat16", cuda)


def test_resuming_a_finished_run_says_it_is_complete_with_its_final_metrics(train_cli, tmp_path, capsys):
    from dpokit.metrics import read_metrics

    run = tmp_path / "run"
    assert main(train_cli(run, "--max-steps", "2")) == 0
    capsys.readouterr()
    lines_before = (run / "metrics.jsonl").read_text()
    assert main(train_cli(run, "--max-steps", "2", "--resume")) == 0
    out = " ".join("".join(capsys.readouterr()).split())
    assert f"{run} is already complete: 2 of 2 steps" in out
    last = read_metrics(run, "train")[-1]
    assert f"│ loss │ {last['loss']:.4g} │" in out  # the final metrics' table, not an empty one
    assert (run / "metrics.jsonl").read_text() == lines_before  # nothing trained, evaluated or logged again
