"""`dpokit train --gpus 2` (FSDP2 over gloo on CPU) matches one process, saves portable checkpoints,
and fails fast when a worker dies."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import ONE_PROCESS_RUN

from dpokit.cli import main
from dpokit.metrics import read_metrics, read_samples

pytestmark = pytest.mark.slow  # two processes each: CI runs them with -m slow


def args_for(train_cli, run_dir, method, *extra):
    """Five steps of `method` at lr 1e-3 (`train_cli`)."""
    return train_cli(run_dir, "--max-steps", "5", "--method", method, "--lr", "1e-3", *extra)


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir, "train")]


def test_two_processes_match_one_process_step_by_step_full_with_accumulation(train_cli, two_process_run, tmp_path):
    one = tmp_path / "one"
    assert main(train_cli(one, *ONE_PROCESS_RUN)) == 0
    assert len(losses(two_process_run)) == 12
    assert losses(two_process_run) == pytest.approx(losses(one), abs=1e-4)
    # Metrics are means over the global batch: accuracies are multiples of 1/4, not of 1/2 per rank.
    for r1, r2 in zip(read_metrics(one, "train"), read_metrics(two_process_run, "train")):
        assert r2["rewards/accuracies"] == pytest.approx(r1["rewards/accuracies"], abs=1e-6)
        assert r2["rewards/margins"] == pytest.approx(r1["rewards/margins"], abs=1e-4)
    # eval.samples under FSDP: every rank generates (collective forwards), the main rank logs the same replies
    assert read_samples(two_process_run) == read_samples(one) and len(read_samples(one)) == 2


def test_a_two_process_checkpoint_resumes_on_one_process(train_cli, two_process_run, tmp_path):
    # Another process count with the same global batch is accepted, and the last steps equal the uninterrupted run's.
    two = shutil.copytree(two_process_run, tmp_path / "two")
    shutil.rmtree(sorted((two / "checkpoints").glob("step_*"))[-1])
    assert main(train_cli(two, *ONE_PROCESS_RUN, "--resume")) == 0
    assert losses(two) == pytest.approx(losses(two_process_run), abs=1e-4)


def test_each_rank_writes_its_shards_and_no_file_holds_the_whole_optimizer_state(two_process_run, tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from dpokit.checkpoint import SHARDS, STATE_FILE, consolidate_checkpoint
    from dpokit.export import export_run

    middle, last = sorted((two_process_run / "checkpoints").glob("step_*"))
    for checkpoint in (middle, last):
        assert sorted(p.name for p in (checkpoint / SHARDS).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        state = torch.load(checkpoint / STATE_FILE, weights_only=True)
        assert "optimizer" not in state and len(state["rng"]) == 2  # the optimizer is only in the ranks' shards
    assert not (middle / "model.safetensors").exists()  # the full model is gathered once, at the end
    # Consolidated from the shards (in one process), the last checkpoint's weights equal the gathered ones.
    consolidate_checkpoint(last, tmp_path / "consolidated")
    gathered, rebuilt = (
        load_file(str(last / "model.safetensors")),
        load_file(str(tmp_path / "consolidated" / "model.safetensors")),
    )
    assert gathered.keys() == rebuilt.keys() and all(torch.equal(gathered[k], rebuilt[k]) for k in gathered)
    # An intermediate checkpoint exports to a model that loads, with the weights of that step (not the last).
    out = export_run(middle, tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(out)
    weight = model.state_dict()["model.layers.0.mlp.down_proj.weight"]
    assert weight.isfinite().all() and not torch.equal(weight, gathered["model.layers.0.mlp.down_proj.weight"])


def test_lora_two_processes_match_one_and_their_checkpoint_loads_in_peft(
    train_cli, tiny_model_dir, ref_cache, tmp_path
):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    straight, two = tmp_path / "straight", tmp_path / "two"
    cached = ("reference.source=cache", f"reference.cache={ref_cache}")
    assert main(args_for(train_cli, straight, "lora", "data.batch_size=4", *cached)) == 0
    assert main(args_for(train_cli, two, "lora", "data.batch_size=2", "--gpus", "2", *cached)) == 0
    assert losses(two) == pytest.approx(losses(straight), abs=1e-4)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(two / "checkpoints" / "step_0000005")
    )
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[3, 40, 41, 5]])).logits.isfinite().all()


def test_qlora_two_processes_match_one_with_the_4_bit_base_whole_on_each_rank(train_cli, ref_cache, tmp_path):
    from safetensors.torch import load_file

    straight, two = tmp_path / "straight", tmp_path / "two"
    cached = ("reference.source=cache", f"reference.cache={ref_cache}")
    assert main(args_for(train_cli, straight, "qlora", "data.batch_size=4", *cached)) == 0
    assert main(args_for(train_cli, two, "qlora", "data.batch_size=2", "--gpus", "2", *cached)) == 0
    assert losses(two) == pytest.approx(losses(straight), abs=1e-4)
    adapters = [
        load_file(str(run / "checkpoints" / "step_0000005" / "adapter_model.safetensors")) for run in (straight, two)
    ]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(adapters[1][k].float().sub(adapters[0][k].float()).abs().max() < 1e-4 for k in adapters[0])


def test_a_crashing_worker_brings_the_run_down_with_its_error(tmp_path):
    recipe = tmp_path / "crashing_recipe.py"
    recipe.write_text(
        textwrap.dedent(
            """
        import os
        import torch.distributed as dist

        def main(argv):
            dist.init_process_group("gloo")
            if dist.get_rank() == 1:
                raise RuntimeError("boom on rank 1")
            dist.barrier()  # rank 0 would wait here forever if nobody noticed rank 1 died

        if __name__ == "__main__":
            main(None)
        """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "dpokit", "train", "--recipe", str(recipe), "--gpus", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "boom on rank 1" in result.stderr
    assert "rank 1" in result.stderr


def test_bf16_full_fine_tuning_keeps_fp32_master_weights_on_two_processes(train_cli, tmp_path):
    from safetensors import safe_open

    one, two = tmp_path / "one", tmp_path / "two"
    bf16 = ("model.dtype=bfloat16", "model.precision=mixed", "training.gradient_accumulation_steps=2")
    assert main(args_for(train_cli, one, "full", "data.batch_size=2", *bf16)) == 0
    assert main(args_for(train_cli, two, "full", "data.batch_size=1", *bf16, "--gpus", "2")) == 0
    # autocast on one process and FSDP2's bf16 gathering round differently; both compute in bf16.
    assert losses(two) == pytest.approx(losses(one), abs=2e-3)
    for run in (one, two):
        checkpoint = sorted((run / "checkpoints").glob("step_*"))[-1]
        with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as weights:
            assert {weights.get_slice(name).get_dtype() for name in weights.keys()} == {"F32"}  # the masters


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def _torchrun_node(train_cli, run, port: int, *extra) -> subprocess.Popen:
    """One "node": `torchrun --nnodes 2 --nproc-per-node 1 -m dpokit train ...` on this machine (c10d rendezvous)."""
    from conftest import TWO_PROCESS_RUN

    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", run.name,
               "-m", "dpokit", *train_cli(run, *TWO_PROCESS_RUN[:-3], "data.batch_size=1", *extra)]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_nodes_under_torchrun_match_two_local_processes(train_cli, two_process_run, tmp_path):
    port, run = _free_port(), tmp_path / "two_nodes"
    nodes = [_torchrun_node(train_cli, run, port), _torchrun_node(train_cli, run, port)]
    outputs = [process.communicate(timeout=300) for process in nodes]
    assert [process.returncode for process in nodes] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert losses(run) == pytest.approx(losses(two_process_run), abs=1e-6)


def test_two_nodes_stopped_by_a_signal_record_the_torchrun_command_that_resumes_them(train_cli, tmp_path):
    import json
    import os
    import signal
    import time

    # torchrun reports a worker's exit 75 as 1: the run says it stopped in stopped.json, with its resume command.
    port, stopped = _free_port(), tmp_path / "stopped"
    nodes = [_torchrun_node(train_cli, stopped, port, "--max-steps", "400") for _ in range(2)]
    deadline = time.monotonic() + 120
    while not (stopped / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(nodes[0].pid, signal.SIGTERM)  # the scheduler's signal to one node's torchrun
    outputs = [process.communicate(timeout=300) for process in nodes]
    marker = json.loads((stopped / "stopped.json").read_text())
    resume = marker["resume"]
    assert resume == f"torchrun --nnodes 2 --nproc-per-node 1 -m dpokit train --config {stopped / 'config.yaml'} " \
                     "--resume (on every node, with the same rendezvous options)"  # fmt: skip
    assert (stopped / "checkpoints" / f"step_{marker['step']:07d}").is_dir()
    assert any(f"Resume with: {resume}" in err for _, err in outputs)


def test_a_live_reference_is_sharded_like_the_policy_and_trains_as_on_one_process(train_cli, tmp_path):
    common = ("--max-steps", "3", "--method", "full", "--lr", "1e-3", "--ref", "live", "training.eval_every=0")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(train_cli(one, *common, "--batch-size", "2")) == 0
    done = subprocess.run(
        [sys.executable, "-m", "dpokit", "--debug", *train_cli(two, *common, "--batch-size", "1", "--gpus", "2")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    for rank in (0, 1):
        assert f"rank {rank}: the live reference is sharded over 2 processes" in done.stderr
    assert losses(two) == pytest.approx(losses(one), abs=1e-5)
    assert losses(one)[0] == pytest.approx(0.693147, abs=1e-5)  # the policy starts as the live reference


def test_the_whole_model_is_fsdps_root_though_training_calls_its_decoder_first(tiny_model_dir, tmp_path):
    """Without a `model(ids)` forward first (the start-up check skipped), the decoder must not become a root."""
    code = textwrap.dedent(f"""
        import os, torch
        import torch.distributed as dist
        from transformers import AutoModelForCausalLM
        from dpokit.config import DistributedConfig
        from dpokit.data.collate import collate_pairs
        from dpokit.distributed import apply_fsdp, init_fsdp_root
        from dpokit.logps import concatenated_forward, decoder_and_head
        os.environ.update(MASTER_ADDR="localhost", MASTER_PORT="{_free_port()}")
        dist.init_process_group("gloo", rank=0, world_size=1)
        model = AutoModelForCausalLM.from_pretrained("{tiny_model_dir}", dtype=torch.float32)
        apply_fsdp(model, DistributedConfig(), torch.device("cpu"))
        init_fsdp_root(model)
        rows = [{{"prompt_ids": [3, 40, 5], "chosen_ids": [50, 5], "rejected_ids": [60, 61, 5]}}]
        concatenated_forward(model, collate_pairs(rows, [0], 0, packing=True, prefix_sharing=True))  # decoder, head
        decoder, head = decoder_and_head(model)
        roots = [m._get_fsdp_state()._is_root for m in (model, decoder, head)]
        print("roots", roots)
        dist.destroy_process_group()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "roots [True, False, False]" in done.stdout
