"""`dpokit quickstart`: the whole pipeline on the bundled demo, then what DPO changed.

The demo (``examples/demo``, installed as ``dpokit.demo``) is a 1M-parameter Llama that was tuned on
helpful and rude replies alike, so it answers most questions with "no. ...", and 2000 preference
pairs that prefer the helpful reply. The quickstart runs the same functions as the commands:

1. ``dpokit prepare``   (`dpokit.data.pipeline.run_prepare`)   -> OUT/prepared
2. ``dpokit ref-logps`` (`dpokit.reference.compute.run_ref_logps`)     -> OUT/ref.h5
3. ``dpokit train --config demo_lora`` (`dpokit.launch.run_recipe`, LoRA DPO) -> OUT/run

then prints eval reward accuracy and margin at step 0 and at the end, greedy replies of the model
before and after, and writes the curves to OUT/run/plots. About 20 seconds on two idle CPU cores.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console
from rich.table import Table

from dpokit import log
from dpokit.artifacts import check_replaceable, is_dpokit_artifact, write_marker
from dpokit.distributed import cpu_threads
from dpokit.errors import DpokitError

DEMO_CONFIG = "demo_lora"
PROMPTS = (
    "what is 3 plus 4?",
    "what colour is the sky?",
    "tell me about the cat.",
    "what is the capital of france?",
)
MAX_NEW_TOKENS = 24


@dataclass
class DemoFiles:
    """The bundled demo's model directory and data files."""

    model: Path
    train: Path
    eval: Path


@dataclass
class QuickstartResult:
    """What one quickstart run measured; `before`/`after` are eval metrics (``rewards/accuracies``, ...)."""

    run_dir: Path
    steps: int
    before: dict[str, float]
    after: dict[str, float]
    replies: list[tuple[str, str, str]]  # (prompt, reply before, reply after)
    plots: list[Path]
    seconds: float


def demo_files() -> DemoFiles:
    """The demo installed with dpokit (package ``dpokit.demo``), checked to be complete."""
    root = Path(str(resources.files("dpokit.demo")))
    files = DemoFiles(model=root / "model", train=root / "data" / "train.jsonl", eval=root / "data" / "eval.jsonl")
    for path in (files.model / "config.json", files.model / "model.safetensors", files.train, files.eval):
        if not path.is_file():
            raise DpokitError(
                f"the bundled demo is incomplete: {path} is missing; reinstall dpokit, or rebuild it with "
                "`python examples/make_demo_data.py && python examples/make_demo_model.py` in a source checkout"
            )
    return files


def run_quickstart(
    out: Path,
    max_steps: Optional[int] = None,
    overwrite: bool = False,
    threads: int = 1,
    console: Optional[Console] = None,
    own_process: bool = False,
) -> QuickstartResult:
    """prepare -> ref-logps -> train on the demo in `out`, then print and return before/after results.

    Args:
        threads: torch's CPU threads. The demo's matrices are tiny; on a machine busy with other
            work, two threads ran the pipeline several times slower than one.
        own_process: this process runs only the quickstart (the `dpokit` command): bitsandbytes, which the
            demo's LoRA does not use, is kept out of it (no import, no `kernels` warning).
    """
    with cpu_threads(threads):
        return quickstart_pipeline(Path(out), max_steps, overwrite, console or log.console(), own_process)


def quickstart_pipeline(
    out: Path, max_steps: Optional[int], overwrite: bool, console: Console, own_process: bool = False
) -> QuickstartResult:
    from dpokit.data.pipeline import PrepareOptions, run_prepare
    from dpokit.launch import run_recipe
    from dpokit.model import block_bitsandbytes_import
    from dpokit.reference.compute import RefLogpsOptions, run_ref_logps

    if own_process:
        block_bitsandbytes_import()

    started = time.perf_counter()
    demo = demo_files()
    prepare_out_folder(out, overwrite, demo)
    prepared, cache, run_dir = out / "prepared", out / "ref.h5", out / "run"

    console.rule("[bold]1/3  dpokit prepare")
    run_prepare(
        PrepareOptions(
            data=str(demo.train), eval_data=str(demo.eval), model=str(demo.model), out=prepared, overwrite=overwrite
        ),
        console,
    )
    console.rule("[bold]2/3  dpokit ref-logps")
    run_ref_logps(
        RefLogpsOptions(
            prepared=str(prepared), model=str(demo.model), out=str(cache), batch_size=32, overwrite=overwrite
        )
    )

    console.rule("[bold]3/3  dpokit train --config demo_lora")
    overrides = [
        f"data.path={prepared}",
        f"model.path={demo.model}",
        f"reference.cache={cache}",
        f"output.dir={run_dir}",
        "training.eval_at_start=true",
    ]  # the step-0 column: the recipe's own eval before any update
    if max_steps is not None:
        overrides.append(f"training.max_steps={max_steps}")
    if overwrite:
        overrides.append("output.overwrite=true")
    replies_before = greedy_replies(load_demo_policy(demo.model, None), demo.model)
    trained = run_recipe(None, ["--config", DEMO_CONFIG, *overrides], own_process=own_process)
    replies_after = greedy_replies(load_demo_policy(demo.model, trained.checkpoint), demo.model)

    result = QuickstartResult(
        run_dir=run_dir,
        steps=trained.steps,
        before=trained.eval_at_start,
        after=trained.eval,
        replies=list(zip(PROMPTS, replies_before, replies_after)),
        plots=curves(run_dir, console),
        seconds=time.perf_counter() - started,
    )
    print_result(result, console)
    return result


def curves(run_dir: Path, console: Console) -> list[Path]:
    """The run's PNG curves, or none (said once) when the optional plotting extra is not installed."""
    from dpokit.metrics import plot_run

    try:
        return plot_run(run_dir)
    except DpokitError as exc:
        log.note(f"no curves: {exc}")
        return []


def prepare_out_folder(out: Path, overwrite: bool, demo: DemoFiles) -> None:
    """Make `out` a marked quickstart folder: new, empty, or (with overwrite) one an earlier quickstart made.

    The marker is what lets a later ``--overwrite`` replace prepared/, ref.h5 and run/ inside it; a
    folder of the user's is refused before any work.
    """
    if is_dpokit_artifact(out, "quickstart"):
        if not overwrite:
            raise DpokitError(f"{out} already has a quickstart run; pass --overwrite to run it again, or another --out")
        return
    check_replaceable(out, "quickstart", overwrite, inputs=(demo.model, demo.train, demo.eval))
    out.mkdir(parents=True, exist_ok=True)
    write_marker(out, "quickstart")


def load_demo_policy(model_dir: Path, adapter: Optional[Path]):
    """The demo model, with a LoRA `adapter` (the run's final checkpoint) applied when given."""
    from peft import PeftModel

    from dpokit.model import load_causal_lm

    model = load_causal_lm(str(model_dir), torch.float32, torch.device("cpu"))
    if adapter is not None:
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(model, str(adapter))
    return model.eval()


@torch.no_grad()
def greedy_replies(model, tokenizer_dir: Path, prompts: tuple[str, ...] = PROMPTS) -> list[str]:
    """The model's greedy reply to each prompt, through the demo's chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    replies = []
    for prompt in prompts:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        output = model.generate(
            **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
        replies.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return replies


def step_zero_note(before: dict[str, float]) -> str:
    """What the step-0 column means, true to its numbers: the policy is the reference, so rewards are
    0 up to rounding; a pair counts as won when its margin is > 0, so rounding can win a few."""
    if before["rewards/accuracies"] == 0:
        return "At step 0 the policy is the reference model: every reward is 0, so no pair is won yet."
    return (
        "At step 0 the policy is the reference model: rewards are 0 up to floating-point rounding (mean margin "
        f"{before['rewards/margins']:.1e}); the {before['rewards/accuracies']:.3f} accuracy counts pairs whose "
        "margin is rounding noise above 0."
    )


def print_result(result: QuickstartResult, console: Console) -> None:
    """Two tables: eval metrics at step 0 and at the end; greedy replies before and after."""
    console.rule("[bold]what DPO changed")
    metrics = Table(title="eval split")
    metrics.add_column("metric", style="bold")
    metrics.add_column("step 0", justify="right")
    metrics.add_column(f"step {result.steps}", justify="right")
    for key, label in (
        ("rewards/accuracies", "reward accuracy"),
        ("rewards/margins", "reward margin"),
        ("loss", "loss"),
    ):
        metrics.add_row(label, f"{result.before[key]:.3f}", f"{result.after[key]:.3f}")
    console.print(metrics)
    console.print(f"[dim]{step_zero_note(result.before)}[/]")

    replies = Table(title="greedy replies")
    replies.add_column("prompt", style="bold")
    replies.add_column("before")
    replies.add_column("after DPO", style="green")
    for prompt, before, after in result.replies:
        replies.add_row(prompt, before, after)
    console.print(replies)
    where = result.plots[0].parent if result.plots else "none (matplotlib not installed)"
    console.print(f"run: {result.run_dir}   curves: {where}   time: {result.seconds:.0f} s")
