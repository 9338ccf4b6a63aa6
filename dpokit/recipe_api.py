"""The names a training recipe uses, in one place: what ``dpokit eject recipe`` copies imports only from here.

Stability: every name in ``__all__`` keeps its name, signature and meaning across dpokit 0.x releases; a
change is announced in CHANGELOG.md one release ahead, with the old name still working in that release.
Anything else in dpokit (the modules these come from) may be renamed or moved without notice, so an ejected
recipe that imports from here keeps running after an upgrade. ``tests/test_recipe_api.py`` holds the
shipped recipe to this module.

Grouped as the recipe uses them: config, process and distributed, data, model, the forward pass, losses,
reference, fidelity checks, optimizer, run directory and checkpoints, metrics and trackers, signals.
`SetupOrder` turns the order ``setup()`` must keep (which step needs which before it) into checks.
"""

from __future__ import annotations

from dpokit.artifacts import is_dpokit_artifact, write_marker, write_text_within
from dpokit.checkpoint import (
    check_finite_weights,
    latest_checkpoint,
    load_checkpoint_state,
    load_training_state,
    rank_rng_state,
    save_checkpoint,
    set_rng_state,
)
from dpokit.config import (
    QUANTIZED_METHODS,
    LoggingConfig,
    TrainConfig,
    config_to_dict,
    config_to_yaml,
    parse_recipe_args,
    uses_bitsandbytes,
)
from dpokit.data.formats import load_prompts
from dpokit.data.loader import StepBatches, collated, default_workers, step_loader
from dpokit.data.prepared import load_prepared, pair_lengths
from dpokit.data.sampler import PairSampler
from dpokit.data.tokenize import PLAIN_TURN_SEPARATOR, TOKENIZER_FILES, LengthLimits, PairTokenizer
from dpokit.distributed import (
    any_rank,
    apply_fsdp,
    background_group,
    barrier,
    broadcast_from_main,
    collective_timeout,
    cpu_threads,
    destroy_distributed,
    gather_to_main,
    init_distributed,
    init_fsdp_root,
    is_collective_timeout,
    reshard,
    set_collective_timeout,
    unresponsive_error,
)
from dpokit.errors import DpokitError
from dpokit.export import export_run
from dpokit.family import attn_implementation_of
from dpokit.fidelity import PADDED, Layout, check_layout, check_pairs, check_step_zero, output_logps
from dpokit.lock import WriterLock, lock_path
from dpokit.log import console, debug, note, print_causes
from dpokit.logps import batch_outputs, chosen_rejected_outputs, decoder_hidden_states, generate_reply, head_logps
from dpokit.losses import (
    build_loss,
    check_loss_outputs,
    check_ranked_loss_outputs,
    check_unpaired_loss_outputs,
    is_reference_free,
)
from dpokit.metrics import (
    MetricsLogger,
    PairMetrics,
    RankMetrics,
    UnpairedMetrics,
    read_metrics,
    summary_table,
    training_progress,
    truncate_metrics,
)
from dpokit.model import (
    block_bitsandbytes_import,
    compile_layers,
    default_device,
    dtype_name,
    lean_loading_blocker,
    load_policy,
    load_policy_sharded,
    load_reference,
    load_reference_sharded,
    pad_token_id,
    stop_token_ids,
    training_dtypes,
    uses_adapters,
)
from dpokit.offload import activation_offloading
from dpokit.optim import OptimizerInBackward, build_optimizer, build_scheduler
from dpokit.preemption import StopSignals, TrainingInterrupted
from dpokit.reference.source import CachedReference, LiveReference, check_token_counts
from dpokit.run_dir import (
    RUN_LOCK,
    STOPPED_FILE,
    check_resume_config,
    clear_old_run,
    clear_stop_marker,
    resume_command,
    start_or_resume,
)
from dpokit.trackers import check_trackers, extra_of, missing_trackers, open_trackers
from dpokit.types import ChosenRejectedOutputs, PairBatch, RankedOutputs, TrainResult


class SetupOrder:
    """The order a recipe's ``setup()`` must keep, checked rather than written in comments.

    ``done(step)`` records a step; ``require(step, before)`` refuses to run `step` before each of `before`
    (naming why, from `WHY`), so an edit that moves a line of an ejected recipe fails at once, not with
    wrong numbers later.
    """

    WHY = {
        ("compile", "layout"): "the layout check compares the uncompiled model with its own forward",
        ("shard", "compile"): "torch.compile wraps the layers FSDP2 then shards",
        ("clear_old_run", "step_zero"): "a refused --overwrite must leave the old run whole",
        ("clear_old_run", "reference"): "a refused --overwrite must leave the old run whole",
        ("optimizer", "shard"): "the optimizer must hold the sharded parameters",
        ("load_policy", "trackers_checked"): "a tracker named but not installed fails before the model loads",
        ("training_state", "optimizer"): "a resumed optimizer state is loaded into the optimizer",
    }

    def __init__(self) -> None:
        self.steps: list[str] = []

    def done(self, step: str) -> None:
        self.steps.append(step)

    def require(self, step: str, *before: str) -> None:
        """Refuse `step` when a step it needs has not been done yet."""
        missing = [need for need in before if need not in self.steps]
        if missing:
            why = "; ".join(self.WHY.get((step, need), f"{step} needs {need}") for need in missing)
            raise RuntimeError(f"setup(): {step} must come after {', '.join(missing)} ({why})")
        self.done(step)


__all__ = [
    # a reference sharded like the policy; FSDP2's root
    "load_reference_sharded",
    "init_fsdp_root",
    # a run stopped with a checkpoint
    "STOPPED_FILE",
    "clear_stop_marker",
    "resume_command",
    # timeouts of collectives (a hung or lost process)
    "collective_timeout",
    "is_collective_timeout",
    "set_collective_timeout",
    "unresponsive_error",
    # config
    "QUANTIZED_METHODS",
    "LoggingConfig",
    "TrainConfig",
    "config_to_dict",
    "config_to_yaml",
    "parse_recipe_args",
    "uses_bitsandbytes",
    # process and distributed
    "any_rank",
    "apply_fsdp",
    "background_group",
    "barrier",
    "broadcast_from_main",
    "cpu_threads",
    "destroy_distributed",
    "gather_to_main",
    "init_distributed",
    "reshard",
    # data
    "PLAIN_TURN_SEPARATOR",
    "TOKENIZER_FILES",
    "LengthLimits",
    "PairBatch",
    "PairSampler",
    "PairTokenizer",
    "StepBatches",
    "collated",
    "default_workers",
    "load_prepared",
    "load_prompts",
    "pair_lengths",
    "step_loader",
    # model
    "activation_offloading",
    "attn_implementation_of",
    "block_bitsandbytes_import",
    "compile_layers",
    "default_device",
    "dtype_name",
    "lean_loading_blocker",
    "load_policy",
    "load_policy_sharded",
    "load_reference",
    "pad_token_id",
    "stop_token_ids",
    "training_dtypes",
    "uses_adapters",
    # the forward pass
    "ChosenRejectedOutputs",
    "RankedOutputs",
    "chosen_rejected_outputs",
    "batch_outputs",
    "decoder_hidden_states",
    "generate_reply",
    "head_logps",
    # losses and reference
    "CachedReference",
    "LiveReference",
    "build_loss",
    "check_loss_outputs",
    "check_ranked_loss_outputs",
    "check_token_counts",
    "check_unpaired_loss_outputs",
    "is_reference_free",
    # fidelity checks
    "PADDED",
    "Layout",
    "check_layout",
    "check_pairs",
    "check_step_zero",
    "output_logps",
    # optimizer
    "OptimizerInBackward",
    "build_optimizer",
    "build_scheduler",
    # run directory and checkpoints
    "RUN_LOCK",
    "WriterLock",
    "check_finite_weights",
    "check_resume_config",
    "clear_old_run",
    "export_run",
    "is_dpokit_artifact",
    "latest_checkpoint",
    "load_checkpoint_state",
    "load_training_state",
    "lock_path",
    "rank_rng_state",
    "save_checkpoint",
    "set_rng_state",
    "start_or_resume",
    "write_marker",
    "write_text_within",
    # metrics, trackers and messages
    "MetricsLogger",
    "PairMetrics",
    "RankMetrics",
    "TrainResult",
    "UnpairedMetrics",
    "check_trackers",
    "console",
    "debug",
    "extra_of",
    "missing_trackers",
    "note",
    "open_trackers",
    "print_causes",
    "read_metrics",
    "summary_table",
    "training_progress",
    "truncate_metrics",
    # errors and signals
    "DpokitError",
    "SetupOrder",
    "StopSignals",
    "TrainingInterrupted",
]
