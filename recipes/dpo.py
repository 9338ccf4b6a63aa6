"""DPO-family preference fine-tuning: dpokit's one training recipe.

Features
    losses      every loss of docs/losses.md (``loss.name``: dpo, ipo, simpo, orpo, sft, ...), weighted sums of
                them (``loss.name=[dpo,sft] loss.weights=[1,0.5]``), or your own ``loss.name=package.module:Class``
    methods     full, lora, dora, qlora, qdora (``model.method``)
    reference   the ``ref.h5`` cache from ``dpokit ref-logps`` (default) or live (``reference.source=live``)
    scale       one process, or FSDP2 over N processes (``dpokit train --gpus N`` or torchrun)
    loop        AdamW, warmup + cosine, gradient accumulation and clipping, eval, checkpoints, exact resume

Run it
    dpokit train --config tiny_lora data.path=prepared model.path=MODEL reference.cache=ref.h5
    python dpo_recipe.py --config tiny_lora data.path=prepared output.dir=runs/ejected ...
    torchrun --nproc-per-node 2 dpo_recipe.py --config tiny_lora data.path=prepared output.dir=runs/ejected-2proc ...

Where to change things (after ``dpokit eject recipe``)
    the loss          ``self.loss_fn`` in ``setup()`` (or just set ``loss.name`` in the config)
    the forward pass  ``policy_logps()``: the log-probs of chosen and rejected under a model, one pass;
                      the policy and a live reference both go through it. The cache was made by
                      ``dpokit.logps.concatenated_forward``: if an edit changes the log-probs, the
                      step-0 check stops the run before any update (use ``reference.source=live``)
    the metrics       ``step_metrics()``: add a key there and it goes to metrics.jsonl and every tracker
    the cadence       ``after_step()``: when to log, evaluate and save

Fidelity (every run, before the first update)
    layout      the batch layout's log-probs are checked against the model's own ``model(ids).logits``
                on a few pairs; a family whose attention it cannot express trains padded (said once)
    step 0      the policy starts as the reference: the first batch's log-probs must equal the
                cache's within the compute dtype's rounding, or the run stops and lists the causes
    precision   full fine-tuning in bf16 keeps fp32 master weights (``model.precision=mixed``)

Reliability
    signals     SIGTERM / Ctrl-C: finish the step, checkpoint, exit 75 with the resume command
    divergence  a non-finite loss or gradient norm stops the run before the update (or skips the
                batch with ``training.skip_nonfinite=true``); non-finite weights are never saved
    one writer  a lock file in the run directory; ``--resume`` refuses a changed meaning (data, loss,
                batch, optimizer) unless ``output.allow_config_change=true``

Assumptions: the data was made by ``dpokit prepare``; the cache by ``dpokit ref-logps`` from the same
data and ``model.path`` (checked, with the command to rebuild it when they differ).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch
from rich.markup import escape

from dpokit.recipe_api import (  # the names an ejected recipe may rely on (see that module's stability note)
    PADDED,
    PLAIN_TURN_SEPARATOR,
    QUANTIZED_METHODS,
    RUN_LOCK,
    STOPPED_FILE,
    TOKENIZER_FILES,
    CachedReference,
    ChosenRejectedOutputs,
    DpokitError,
    Layout,
    LengthLimits,
    LiveReference,
    LoggingConfig,
    MetricsLogger,
    OptimizerInBackward,
    PairBatch,
    PairMetrics,
    PairSampler,
    PairTokenizer,
    RankedOutputs,
    RankMetrics,
    SetupOrder,
    StepBatches,
    StopSignals,
    TrainConfig,
    TrainingInterrupted,
    TrainResult,
    UnpairedMetrics,
    WriterLock,
    activation_offloading,
    any_rank,
    apply_fsdp,
    attn_implementation_of,
    background_group,
    barrier,
    batch_outputs,
    block_bitsandbytes_import,
    broadcast_from_main,
    build_loss,
    build_optimizer,
    build_scheduler,
    check_finite_weights,
    check_layout,
    check_loss_outputs,
    check_pairs,
    check_ranked_loss_outputs,
    check_resume_config,
    check_step_zero,
    check_token_counts,
    check_trackers,
    check_unpaired_loss_outputs,
    clear_old_run,
    clear_stop_marker,
    collated,
    collective_timeout,
    compile_layers,
    config_to_dict,
    config_to_yaml,
    console,
    cpu_threads,
    debug,
    decoder_hidden_states,
    default_device,
    default_workers,
    destroy_distributed,
    dtype_name,
    export_run,
    gather_to_main,
    generate_reply,
    head_logps,
    init_distributed,
    init_fsdp_root,
    is_collective_timeout,
    is_dpokit_artifact,
    is_reference_free,
    latest_checkpoint,
    lean_loading_blocker,
    load_checkpoint_state,
    load_policy,
    load_policy_sharded,
    load_prepared,
    load_prompts,
    load_reference,
    load_reference_sharded,
    load_training_state,
    lock_path,
    note,
    open_trackers,
    output_logps,
    pad_token_id,
    pair_lengths,
    parse_recipe_args,
    print_causes,
    rank_rng_state,
    read_metrics,
    reshard,
    resume_command,
    save_checkpoint,
    set_collective_timeout,
    set_rng_state,
    start_or_resume,
    step_loader,
    stop_token_ids,
    summary_table,
    training_dtypes,
    training_progress,
    truncate_metrics,
    unresponsive_error,
    uses_adapters,
    uses_bitsandbytes,
    write_marker,
    write_text_within,
)


class DPORecipe:
    """setup() builds everything from the config, train() is the loop, save_checkpoint() writes."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.console = console(stderr=True)  # progress and tables: silent below the info log level

    # ------------------------------------------------------------------------------------- setup

    def setup(self) -> None:
        cfg = self.cfg
        order = SetupOrder()  # each `order.require(step, *needed)` below refuses a step moved before what it needs
        self.dist = init_distributed(cfg.distributed.startup_timeout_s)
        self.device = default_device()
        self.process_settings = contextlib.ExitStack()  # undone in cleanup()
        self.process_settings.enter_context(
            cpu_threads(cfg.distributed.cpu_threads if self.device.type == "cpu" else None)
        )
        self.adapters = uses_adapters(cfg.model.method)
        self.run_dir = Path(cfg.output.dir)
        torch.manual_seed(cfg.training.seed)

        self.data = load_prepared(cfg.data.path)
        self.train_split = self.data.split("train")
        self.eval_split = self.data.split("eval") if "eval" in self.data.splits else None

        if self.dist.is_main:
            check_trackers(cfg.logging.report_to, default=LoggingConfig().report_to)
        order.done("trackers_checked")
        self._tokenizer = None  # loaded at first use (`tokenizer`)
        self._check_tokenizer_files()
        self.shape = self.data.shape  # pairs, ranked (k scored completions per prompt) or unpaired (KTO's)
        self.unit = {"ranked": "groups", "unpaired": "examples"}.get(self.shape, "pairs")  # what a batch counts
        self.loss_fn = build_loss(cfg.loss, shape=self.shape)
        self.token_stats = tuple(getattr(self.loss_fn, "token_stats", ()))  # full-vocabulary values the loss asks for
        self.lock = WriterLock(lock_path(self.run_dir, RUN_LOCK), f"run directory {self.run_dir}", self.announce)
        if self.dist.is_main:
            self.lock.acquire()
        checkpoint = self._resume_checkpoint()
        self.params_dtype, self.compute_dtype = training_dtypes(cfg.model, self.device)
        order.require("load_policy", "trackers_checked")
        self.policy, self.sharded = self._load_policy()
        self.prompts_to_answer = self.sample_prompts()
        self.pad_id = pad_token_id(self.policy)
        self.reference = self._build_reference()
        order.done("reference")
        self.step_zero_pending = checkpoint is None and self.reference is not None
        self.layout = self._startup_layout(Layout(cfg.data.packing, cfg.data.prefix_sharing, cfg.data.pack_length))
        order.done("layout")
        if cfg.model.activation_offloading and self.device.type != "cuda":
            self.announce(
                "model.activation_offloading moves saved activations from the GPU to CPU memory; "
                "on CPU they are already there, so it changes nothing"
            )
        order.require("compile", "layout")
        if cfg.training.compile:
            compile_layers(self.policy, cfg.training.compile_backend)
            self.loss_fn.compile(backend=cfg.training.compile_backend)
        order.require("shard", "compile")
        if self.dist.world_size > 1 and not self.sharded:
            self.shard(self.policy)
        init_fsdp_root(self.policy)  # the whole model is the root, though training calls its decoder and head

        self.sampler = PairSampler(
            num_examples=len(self.train_split),
            batch_size=cfg.data.batch_size,
            accumulation_steps=cfg.training.gradient_accumulation_steps,
            world_size=self.dist.world_size,
            rank=self.dist.rank,
            seed=cfg.training.seed,
            shuffle=cfg.data.shuffle,
            lengths=pair_lengths(self.train_split).tolist() if cfg.data.group_by_length else None,
        )
        if self.sampler.steps_per_epoch == 0:
            raise DpokitError(
                f"the train split has {len(self.train_split)} pairs, fewer than one global batch of "
                f"{self.sampler.global_batch_size} (data.batch_size x processes x training.gradient_accumulation_steps); "
                "lower data.batch_size or training.gradient_accumulation_steps"
            )
        self.total_steps = cfg.training.max_steps or cfg.training.epochs * self.sampler.steps_per_epoch
        order.require("optimizer", "shard")
        if cfg.training.optimizer_in_backward:  # each parameter steps in backward; its gradient is freed at once
            self.optimizer = OptimizerInBackward(self.policy, cfg.optimizer, self.total_steps, cfg.scheduler)
            self.scheduler = self.optimizer.schedules
        else:
            self.optimizer = build_optimizer(self.policy, cfg.optimizer)
            self.scheduler = build_scheduler(self.optimizer, self.total_steps, cfg.scheduler)
        self.step = 0
        self.skipped_steps = 0
        order.require("training_state", "optimizer")
        if checkpoint is not None:
            self._load_training_state(checkpoint)
        replacing = checkpoint is None and cfg.output.overwrite and (self.run_dir / "metrics.jsonl").exists()
        if replacing and self.step_zero_pending:  # the step-0 check too, before an old run is given up
            self.check_first_batch()
        order.done("step_zero")
        order.require("clear_old_run", "reference", "step_zero")
        if self.dist.is_main:
            if checkpoint is None and cfg.output.overwrite:  # every check has passed: now the old run may go
                clear_old_run(self.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not is_dpokit_artifact(self.run_dir, "run"):
                write_marker(self.run_dir, "run")  # `--overwrite` later replaces only what this run wrote
            self._write_config(checkpoint)
            clear_stop_marker(self.run_dir)
        self.logger = MetricsLogger(
            self.run_dir, enabled=self.dist.is_main, trackers=self._open_trackers(checkpoint), announce=self.announce
        )
        self.signals = StopSignals(self.announce)
        self.pending_checkpoint = None  # an asynchronous checkpoint not yet complete
        self.checkpoint_group = background_group() if cfg.training.async_save else None
        self.last_saved_step = self.step if checkpoint is not None else None
        self.last_save_time = time.monotonic()
        self.collective_wait = cfg.distributed.startup_timeout_s  # until the first step is done (`train`)

    def autocast(self):
        """Mixed precision on one process: fp32 master weights, the forward in the compute dtype.
        (Under FSDP2 its MixedPrecisionPolicy does this: parameters are gathered in the compute dtype.)"""
        if self.params_dtype == self.compute_dtype or self.dist.world_size > 1:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def announce(self, message: str) -> None:
        if self.dist.is_main:
            note(message)

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """FSDP2 over the processes (``distributed`` config): the policy, and a live reference like it."""
        return apply_fsdp(model, self.cfg.distributed, self.device, self.compute_dtype)

    def _load_policy(self) -> tuple[torch.nn.Module, bool]:
        """The policy, and whether it is already sharded: with several processes it is built on the meta device,
        sharded, and each rank reads only its own shards (``model.lean_loading``), where the method allows."""
        cfg = self.cfg
        if self.dist.world_size > 1 and cfg.model.lean_loading:
            blocker = lean_loading_blocker(cfg.model, cfg.reference.adapter, cfg.training.compile)
            if blocker is None:
                return load_policy_sharded(cfg.model, cfg.lora, self.device, self.shard), True
            self.announce(f"every process loads the whole model before sharding it: {blocker}")
        return load_policy(cfg.model, cfg.lora, self.device, adapter=cfg.reference.adapter), False

    def _startup_layout(self, asked: Layout) -> Layout:
        """The batch layout, checked against the model's own logits on a few pairs (`check_layout`).

        A sharded policy trained from a cache whose `dpokit ref-logps` pass ran that check on these very
        weights (the fingerprints matched) with the same attention skips it: the step-0 check then compares
        the policy's first batch with the cache. Under FSDP the check is a full forward pass of gathered units.
        """
        reference = self.reference
        checked = getattr(reference, "checked_layout", None) if isinstance(reference, CachedReference) else None
        if (
            self.sharded
            and self.step_zero_pending
            and checked is not None
            and reference.attn_implementation == attn_implementation_of(self.policy)
        ):
            return PADDED if checked == PADDED.name else asked
        with self.autocast():
            layout = check_layout(
                self.policy, check_pairs(self.train_split), self.pad_id, asked, self.announce, self.compute_dtype
            )
        if self.sharded:
            reshard(self.policy)
        return layout

    @property
    def tokenizer(self):
        """The model's tokenizer, loaded at first use: eval replies, ``eval.prompts_file``, the final checkpoint.
        A training step needs none, and a loaded tokenizer costs the process about 30 MiB."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.cfg.model.tokenizer or self.cfg.model.path)
        return self._tokenizer

    def _check_tokenizer_files(self) -> None:
        """Stop now, not at the final checkpoint, when the tokenizer folder the run will need has no tokenizer."""
        source = Path(self.cfg.model.tokenizer or self.cfg.model.path)
        if source.is_dir() and not any((source / name).is_file() for name in TOKENIZER_FILES):
            raise DpokitError(
                f"{source} has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
                "name the tokenizer's folder with model.tokenizer=PATH"
            )

    def _resume_checkpoint(self):
        """The checkpoint to resume from (``--resume``, after checking the run keeps its meaning), or None
        for a fresh run (`dpokit.run_dir.start_or_resume`; on ``--overwrite`` the old run's own files are cleared
        only when setup has passed every check, `clear_old_run`)."""
        checkpoint = start_or_resume(self.run_dir, self.cfg.output, self.announce)
        if checkpoint is not None:
            self.resume_state = load_training_state(checkpoint)
            check_resume_config(self.resume_state, self.cfg, self.dist.world_size, checkpoint, self.announce)
        return checkpoint

    def _open_trackers(self, checkpoint) -> list:
        """The trackers of ``logging.report_to`` (main process only), continuing their runs on resume."""
        log = self.cfg.logging
        if not self.dist.is_main:
            return []
        return open_trackers(
            log.report_to,
            self.run_dir,
            log.project,
            log.run_name,
            config_to_dict(self.cfg),
            resume=checkpoint is not None,
            tracking_uri=log.mlflow_tracking_uri,
        )

    def _write_config(self, checkpoint) -> None:
        """``config.yaml`` describes the run; a resumed run with allowed changes keeps the old one beside it."""
        path = self.run_dir / "config.yaml"
        text = config_to_yaml(self.cfg)
        if checkpoint is not None and path.is_file() and path.read_text() != text:
            write_text_within(self.run_dir, "run", self.run_dir / f"config.step_{self.step:07d}.yaml", path.read_text())
        write_text_within(self.run_dir, "run", path, text)

    def _build_reference(self):
        cfg = self.cfg
        if is_reference_free(self.loss_fn):
            return None
        if cfg.reference.source == "live":
            if self.adapters and not cfg.reference.adapter:
                return LiveReference(self.policy, adapters_off=True, forward=self.policy_logps)
            args = (cfg.model.path, self.compute_dtype, self.device)
            options = dict(adapter=cfg.reference.adapter, attn_implementation=attn_implementation_of(self.policy))
            if self.dist.world_size > 1:  # sharded like the policy: no device holds a whole second model
                frozen = load_reference_sharded(*args, self.shard, **options)
                init_fsdp_root(frozen)
                debug(f"rank {self.dist.rank}: the live reference is sharded over {self.dist.world_size} processes")
            else:
                frozen = load_reference(*args, **options)
            return LiveReference(frozen, adapters_off=False, forward=self.policy_logps)
        if not cfg.reference.cache:
            raise DpokitError(
                "no reference: set reference.cache=ref.h5 (build it with `dpokit ref-logps`) or reference.source=live"
            )
        splits = ["train"] + (["eval"] if self.eval_split is not None else [])
        reference_model = cfg.reference.model or cfg.model.path  # reference.model: the policy starts elsewhere
        cached = CachedReference(cfg.reference.cache, self.data, reference_model, cfg.reference.adapter, splits)
        if getattr(self.loss_fn, "needs_per_token_reference", False) and not cached.per_token:
            raise DpokitError(
                f"loss {cfg.loss.get('name')} needs per-token reference log-probs and {cfg.reference.cache} has only "
                f"sequence sums; rebuild it with `{cached.rebuild_command} --per-token` or train with --ref live"
            )
        for what, theirs, ours in (
            ("compute dtype", cached.dtype, dtype_name(self.compute_dtype)),
            ("attention implementation", cached.attn_implementation, attn_implementation_of(self.policy)),
        ):
            if theirs != ours:
                self.announce(
                    f"the reference cache was computed with {what} {theirs}, this run uses {ours}; the step-0 check "
                    f"will tell whether the difference matters (rebuild with `{cached.rebuild_command}` to match)"
                )
        return cached

    def _load_training_state(self, checkpoint: Path) -> None:
        state = self.resume_state
        self.step = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.sampler.load_state_dict(state["sampler"])
        self.scheduler.load_state_dict(state["scheduler"])
        load_checkpoint_state(self.policy, self.optimizer, checkpoint, state, self.adapters)
        if state.get("loss"):  # a loss with running statistics (bco)
            self.loss_fn.load_state_dict(state["loss"])
        set_rng_state(rank_rng_state(state, self.dist.rank, self.dist.world_size))
        if self.dist.is_main:
            truncate_metrics(self.run_dir, after_step=self.step)
            self.console.print(f"resumed from {checkpoint} at step {self.step}")

    # -------------------------------------------------------------------------------------- loop

    def batch(self, split, indices: list[int]) -> PairBatch:
        """The pairs `indices` of a prepared split, collated in the checked layout, on the device."""
        layout = self.layout
        return collated(split, indices, self.pad_id, layout.packing, layout.prefix_sharing, layout.pack_length).to(
            self.device
        )

    def step_batches(self):
        """The steps still to run, each a list of this rank's collated micro-batches, prepared ahead by
        ``data.num_workers`` processes (default: 2 on CUDA, none on CPU) and pinned on CUDA."""
        layout, workers = self.layout, self.cfg.data.num_workers
        batches = StepBatches(
            self.train_split, self.sampler, self.pad_id, layout.packing, layout.prefix_sharing, layout.pack_length
        )
        first = self.sampler.steps_done
        workers = default_workers(self.device) if workers is None else workers
        return iter(step_loader(batches, first, first + self.total_steps - self.step, workers, self.device))

    def policy_logps(
        self, model: torch.nn.Module, batch: PairBatch, training: bool = False
    ) -> ChosenRejectedOutputs | RankedOutputs:
        """The forward pass: per-pair log-probs of the chosen and rejected completions under `model` (per completion
        for ranked groups).

        One pass over the batch's rows, as `dpokit ref-logps` made the cache: the decoder over every row
        (prompt once, every completion behind it), then the output head fused with the log-softmax on the
        completion positions only (chunked, fp32, no full logits), then the sums split per pair or group. With
        `training`, a mixture-of-experts model also returns its load-balancing term. Edit here to change how
        log-probs are computed; the step-0 check tells whether the reference cache still matches.
        """
        hidden, router_aux = decoder_hidden_states(model, batch, router_aux_loss=training)  # [R, L, H], any layout
        completions = head_logps(model, hidden, batch, self.cfg.data.logps_chunk_size, self.token_stats)  # fused head
        return batch_outputs(completions, batch, self.token_stats, router_aux)

    def pair_outputs(self, batch: PairBatch, split: str):
        """Policy outputs and the loss's outputs for one batch: ``(losses, chosen_rewards, rejected_rewards)`` per
        pair, ``(losses, rewards)`` per ranked group and completion, or per unpaired example."""
        training = split == "train"
        offload = training and self.cfg.model.activation_offloading
        with self.autocast(), activation_offloading(offload, self.device, self.policy):
            policy_out = self.policy_logps(self.policy, batch, training=training)
        reference_out = None
        if self.reference is not None:
            reference_out = self.reference.outputs(batch, split)
            check_token_counts(policy_out, reference_out, split)
            if self.step_zero_pending and training:
                self.check_step_zero(policy_out, reference_out, batch)
        if self.shape == "ranked":
            outputs = check_ranked_loss_outputs(
                self.loss_fn, self.loss_fn(policy_out, reference_out), batch.num_pairs, batch.num_outputs
            )
        elif self.shape == "unpaired":
            outputs = check_unpaired_loss_outputs(
                self.loss_fn, self.loss_fn(policy_out, reference_out), batch.num_pairs
            )
        else:
            outputs = check_loss_outputs(self.loss_fn, self.loss_fn(policy_out, reference_out), batch.num_pairs)
        return policy_out, outputs

    def new_metrics(self) -> PairMetrics | RankMetrics | UnpairedMetrics:
        """Sums for the step's or the evaluation's metrics: per pair, per ranked group, or per unpaired example."""
        return {"ranked": RankMetrics, "unpaired": UnpairedMetrics}.get(self.shape, PairMetrics)(self.device)

    def check_first_batch(self) -> None:
        """The step-0 check on this rank's first micro-batch, run in setup (no gradients) when a fresh run is
        about to replace an old one, so that a policy that does not start as the reference leaves the old run."""
        batch = StepBatches(
            self.train_split,
            self.sampler,
            self.pad_id,
            self.layout.packing,
            self.layout.prefix_sharing,
            self.layout.pack_length,
        )[self.sampler.steps_done][0].to(self.device)
        with torch.no_grad(), self.autocast():
            policy_out = self.policy_logps(self.policy, batch)
        reference_out = self.reference.outputs(batch, "train")
        check_token_counts(policy_out, reference_out, "train")
        self.check_step_zero(policy_out, reference_out, batch)

    def check_step_zero(self, policy_out, reference_out, batch: PairBatch) -> None:
        """The first batch of a fresh run: the policy must start as the reference (`dpokit.fidelity`); when it
        does not, the same batch in eval mode tells whether the policy's train mode is random."""
        self.step_zero_pending = False
        quantized = self.cfg.model.method in QUANTIZED_METHODS  # a 4-bit base is not the cache's 16-bit reference
        described = getattr(self.reference, "description", "a live reference")

        def eval_logps() -> torch.Tensor:
            self.policy.eval()
            try:
                with torch.no_grad(), self.autocast():
                    out = self.policy_logps(self.policy, batch)
            finally:
                self.policy.train()
            return output_logps(out)[0]

        elsewhere = self.cfg.reference.model is not None  # the policy starts from another checkpoint, on purpose
        difference = check_step_zero(
            policy_out,
            reference_out,
            self.compute_dtype,
            described,
            refuse=not (quantized or elsewhere),
            eval_logps=eval_logps,
        )
        if quantized:
            self.announce(
                f"step 0: the 4-bit policy differs from the reference by up to {difference:.3g} nats per sequence"
            )
        elif elsewhere:
            self.announce(
                f"step 0: the policy ({self.cfg.model.path}) starts up to {difference:.3g} nats per sequence from the "
                f"reference ({self.cfg.reference.model}), as reference.model says"
            )

    def train_step(self, micro_batches: list[PairBatch]) -> PairMetrics | RankMetrics | UnpairedMetrics:
        """Forward and backward over this rank's micro-batches of one optimizer step."""
        metrics = self.new_metrics()
        self.step_losses: list[tuple[torch.Tensor, torch.Tensor]] = []  # for naming the pairs of a non-finite loss
        pairs_per_rank = self.cfg.data.batch_size * len(micro_batches)
        for micro_step, micro_batch in enumerate(micro_batches):
            if hasattr(self.policy, "set_requires_gradient_sync"):  # FSDP: reduce gradients once per step
                self.policy.set_requires_gradient_sync(micro_step == len(micro_batches) - 1)
            batch = micro_batch.to(self.device)
            policy_out, (losses, *rewards) = self.pair_outputs(batch, "train")
            # Sum over pairs (groups) / pairs per rank: FSDP averages gradients over ranks -> mean over the global batch.
            objective = losses.sum() / pairs_per_rank
            if policy_out.router_aux_loss is not None:  # MoE load balancing, once per micro-batch
                objective = objective + policy_out.router_aux_loss / len(micro_batches)
            objective.backward()
            metrics.add(losses, *rewards, policy_out, batch.num_tokens, self.loss_terms())
            self.step_losses.append((batch.index, losses.detach()))
        return metrics

    def optimizer_step(
        self, metrics: PairMetrics | RankMetrics | UnpairedMetrics, control: torch.Tensor
    ) -> tuple[float, list[bool]]:
        """Clip, then update, unless the loss or the gradient norm is not finite (`nonfinite_step`). Returns the
        gradient norm and the `control` flags (OR-ed over ranks), read from the device with the loss and the norm:
        the step's one read."""
        if isinstance(self.optimizer, OptimizerInBackward):  # updated in backward: no gradients left to measure
            loss_sum, *flags = torch.cat([metrics.sums[:1], control.to(metrics.sums)]).tolist()
            if not math.isfinite(loss_sum):
                self.nonfinite_step(loss_sum, float("nan"))
            self.scheduler.step()
            return float("nan"), [flag > 0 for flag in flags]
        max_norm = self.cfg.training.max_grad_norm
        params = [p for p in self.policy.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm else float("inf"))
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
            grad_norm = grad_norm.full_tensor()
        # The loss (summed over ranks already), the norm and the flags, together.
        values = torch.cat([metrics.sums[:1], grad_norm.reshape(1).to(metrics.sums), control.to(metrics.sums)])
        loss_sum, grad_norm, *flags = values.tolist()
        if math.isfinite(loss_sum) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
        else:
            self.nonfinite_step(loss_sum, grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm, [flag > 0 for flag in flags]

    def control_flags(self) -> torch.Tensor:
        """This rank's stop request and save-time flags, summed over ranks with the step's metrics (any rank's wins)."""
        flags = [float(self.signals.requested is not None), float(self.save_time_due())]
        return torch.tensor(flags, dtype=torch.float64).to(self.device, non_blocking=True)

    def nonfinite_step(self, loss_sum: float, grad_norm: float) -> None:
        """Stop before the update (the weights stay finite), or skip the batch when asked; name the pairs."""
        bad = [int(i) for index, losses in self.step_losses for i in index[~torch.isfinite(losses.cpu())].tolist()]
        gathered = gather_to_main(bad)
        pairs = broadcast_from_main(sorted(i for part in gathered for i in part) if gathered is not None else None)
        what = "loss" if not math.isfinite(loss_sum) else "gradient norm"
        where = f"step {self.step + 1}: non-finite {what} ({loss_sum:g} / grad norm {grad_norm:g})"
        if pairs:
            where += f" on train pairs {', '.join(map(str, pairs[:10]))}{' ...' if len(pairs) > 10 else ''}"
        if self.cfg.training.skip_nonfinite:
            self.skipped_steps += 1
            self.announce(f"{where}: batch skipped, no update ({self.skipped_steps} skipped so far)")
            return
        last = latest_checkpoint(self.run_dir)
        when = (
            "the update was already applied in backward (training.optimizer_in_backward), so nothing more is saved"
            if isinstance(self.optimizer, OptimizerInBackward)
            else "stopped before updating the weights"
        )
        raise DpokitError(
            f"{where}; {when}. Last good checkpoint: "
            f"{last or 'none (nothing was saved yet)'}. Lower optimizer.lr, check the loss and those pairs, or set "
            "training.skip_nonfinite=true to skip such batches"
        )

    def step_metrics(
        self, metrics: PairMetrics | RankMetrics | UnpairedMetrics, seconds: float, grad_norm: float, lr: float
    ) -> dict[str, float]:
        values = metrics.means()
        values.update(
            lr=lr,
            grad_norm=grad_norm,  # NaN with training.optimizer_in_backward: no gradient outlives its update
            **{f"{self.unit}_per_s": metrics.num_pairs / seconds},
            tokens_per_s=metrics.num_tokens / seconds,
            peak_memory_mb=peak_memory_mb(self.device),
        )
        if self.skipped_steps:
            values["skipped_steps"] = self.skipped_steps
        return values

    def loss_terms(self) -> dict[str, torch.Tensor]:
        """A weighted combination's per-term, per-pair values of the last call (logged as ``loss/<name>``)."""
        return getattr(self.loss_fn, "term_values", {})

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss, reward accuracy and margins over the eval split (each rank a slice, reduced)."""
        self.policy.eval()
        self.loss_fn.eval()  # a loss's running statistics (bco) learn from training batches only
        metrics = self.new_metrics()
        size, world, rank = len(self.eval_split), self.dist.world_size, self.dist.rank
        per_step = self.cfg.data.batch_size * world
        steps = math.ceil(size / per_step)
        if self.cfg.training.eval_batches:
            steps = min(steps, self.cfg.training.eval_batches)
        for k in range(steps):
            start = k * per_step + rank * self.cfg.data.batch_size
            indices = list(range(start, min(start + self.cfg.data.batch_size, size)))
            # Every rank must run the same forwards under FSDP; an empty slice recomputes row 0 unlogged.
            batch = self.batch(self.eval_split, indices or [0])
            policy_out, (losses, *rewards) = self.pair_outputs(batch, "eval")
            if indices:
                metrics.add(losses, *rewards, policy_out, batch.num_tokens, self.loss_terms())
        metrics.all_reduce()
        self.policy.train()
        self.loss_fn.train()
        return metrics.means()

    @torch.no_grad()
    def sample_prompts(self) -> list[list[int]]:
        """Prompt ids the policy answers at every eval: the first ``eval.samples`` of the eval split, then those
        of ``eval.prompts_file``, made as `dpokit prepare` made the data's (its chat template or separator)."""
        cfg = self.cfg.eval
        prompts = (
            list(self.eval_split[: cfg.samples]["prompt_ids"]) if cfg.samples and self.eval_split is not None else []
        )
        if cfg.prompts_file:
            manifest = self.data.manifest  # data written by other tools may not record a template: the tokenizer's
            self.tokenizer.chat_template = manifest.get("chat_template", self.tokenizer.chat_template)
            as_prepared = PairTokenizer(
                self.tokenizer, LengthLimits(), manifest.get("separator") or PLAIN_TURN_SEPARATOR
            )
            prompts += as_prepared.prompt_ids(load_prompts(cfg.prompts_file))
        return prompts

    def eval_samples(self) -> list[dict[str, str]]:
        """The policy's replies to `sample_prompts` (greedy unless ``eval.temperature``). Every rank generates
        the same prompts with the same seed (under FSDP each forward is collective); the main rank logs them."""
        cfg = self.cfg.eval
        if not self.prompts_to_answer:
            return []
        self.policy.eval()
        replies = []
        stop_ids = stop_token_ids(self.policy, self.tokenizer)
        devices = [torch.cuda.current_device()] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # sampling leaves the training RNG as it was (exact resume)
            torch.manual_seed(self.cfg.training.seed + self.step)
            for prompt_ids in self.prompts_to_answer:
                with self.autocast():
                    reply = generate_reply(
                        self.policy, prompt_ids, cfg.max_new_tokens, cfg.temperature, stop_ids, self.device
                    )
                replies.append(
                    {
                        "prompt": self.tokenizer.decode(prompt_ids, skip_special_tokens=False),
                        "completion": self.tokenizer.decode(reply, skip_special_tokens=True).strip(),
                    }
                )
        self.policy.train()
        return replies

    def evaluate_and_log(self) -> dict[str, float]:
        """`evaluate`, the replies of ``eval.samples``, both logged at this step; the first and latest replies
        are kept for the closing table."""
        with self.long_waits():  # replies are generated on each rank, then gathered
            metrics = self.evaluate()
            replies = (self.step, self.eval_samples())
        self.logger.log(self.step, "eval", metrics)
        self.logger.log_samples(*replies)
        self.first_replies = self.first_replies or replies
        self.last_replies = replies
        return metrics

    def train(self) -> TrainResult:
        """The loop: step, then `after_step` logs, evaluates and saves on one cadence; the last step always does all three."""
        progress = training_progress(self.console, enabled=self.dist.is_main)
        self.result = TrainResult(run_dir=self.run_dir, steps=self.step, checkpoint=latest_checkpoint(self.run_dir))
        self.first_replies = self.last_replies = None  # (step, replies) of the first and latest eval
        if self.step and self.step >= self.total_steps:  # `--resume` of a finished run: nothing to do
            return self.finished_result()
        with progress:
            task = progress.add_task("train", total=self.total_steps, completed=self.step, rate="", status="")
            if self.cfg.training.eval_at_start and self.step == 0 and self.eval_split is not None:
                self.result.eval_at_start = self.evaluate_and_log()
            self.policy.train()
            self.signals.install()
            steps = self.step_batches()
            started_at = self.step
            status = ""  # the last logged loss and accuracy
            while self.step < self.total_steps:
                started = time.perf_counter()
                metrics = self.train_step(next(steps))
                self.sampler.advance()
                control = metrics.all_reduce(self.control_flags())  # the flags ride on the metrics' all-reduce
                lr = self.scheduler.get_last_lr()[0]
                grad_norm, (stop, time_due) = self.optimizer_step(metrics, control)
                self.step += 1
                if self.step == started_at + 1:  # compiled, warmed up: steady-state steps wait less for a peer
                    self.collective_wait = self.cfg.distributed.timeout_s
                    set_collective_timeout(self.collective_wait)
                seconds = time.perf_counter() - started
                if self.step == self.total_steps or self.step % self.cfg.training.log_every == 0:
                    self.result.train = self.step_metrics(metrics, seconds, grad_norm, lr)  # reads the device
                    status = f"loss {self.result.train['loss']:.4f} acc {self.result.train['rewards/accuracies']:.2f}"
                rate = f"{self.sampler.global_batch_size / seconds:.1f} {self.unit}/s"
                progress.update(task, completed=self.step, rate=rate, status=status)
                self.after_step(self.step == self.total_steps, stop, time_due)
        self.result.steps = self.step
        set_collective_timeout(self.cfg.distributed.startup_timeout_s)  # rank 0 alone merges while the others wait
        if self.cfg.output.merge and self.adapters and self.dist.is_main and self.result.checkpoint is not None:
            export_run(self.result.checkpoint, self.run_dir / "merged", base_model=self.cfg.model.path, overwrite=True)
        if self.dist.is_main:
            self.console.print(summary_table(f"dpokit train: {self.step} steps", _summary_rows(self.result)))
            if self.last_replies and self.last_replies[1]:
                self.console.print(samples_table(self.first_replies, self.last_replies))
        return self.result

    def finished_result(self) -> TrainResult:
        """The result of a run resumed after its last step, from its ``metrics.jsonl``: no step, eval or save."""
        for split, into in (("train", self.result.train), ("eval", self.result.eval)):
            records = [r for r in read_metrics(self.run_dir, split) if r["step"] <= self.step]
            into.update({k: v for k, v in (records[-1] if records else {}).items() if k not in ("step", "split")})
        if self.dist.is_main:
            self.console.print(
                f"{self.run_dir} is already complete: {self.step} of {self.total_steps} steps "
                "(to train further: a larger training.max_steps with --allow-config-change); its final metrics:"
            )
            self.console.print(summary_table(f"dpokit train: {self.step} steps", _summary_rows(self.result)))
        return self.result

    def after_step(self, is_last: bool, stop: bool = False, time_due: bool = False) -> None:
        """Log, evaluate and save when due (every ``log_every`` / ``eval_every`` / ``save_every`` steps or
        ``save_every_minutes``), all three after the last step; a requested stop checkpoints and exits. `stop` and
        `time_due` are the step's flags over all ranks (asked again after an evaluation, which takes time)."""
        cfg = self.cfg.training
        self.finish_checkpoint(wait=False)
        if is_last or self.step % cfg.log_every == 0:
            self.logger.log(self.step, "train", self.result.train)
        if self.eval_split is not None and (is_last or (cfg.eval_every and self.step % cfg.eval_every == 0)):
            self.result.eval = self.evaluate_and_log()
            stop, time_due = any_rank([self.signals.requested is not None, self.save_time_due()], self.device)
        if stop and not is_last:
            self.stop_with_checkpoint()
        if is_last or time_due or (cfg.save_every and self.step % cfg.save_every == 0):
            self.result.checkpoint = self.save_checkpoint(asynchronous=cfg.async_save and not is_last)

    def save_time_due(self) -> bool:
        minutes = self.cfg.training.save_every_minutes
        return bool(minutes) and time.monotonic() - self.last_save_time >= 60 * minutes

    def stop_with_checkpoint(self) -> None:
        """A stop was requested (SIGTERM/SIGINT on any rank): checkpoint this step, say how to resume, exit 75."""
        self.finish_checkpoint(wait=True)
        path = self.save_checkpoint() if self.last_saved_step != self.step else latest_checkpoint(self.run_dir)
        resume = resume_command(self.run_dir / "config.yaml", self.dist.world_size)
        if self.dist.is_main:  # a scheduler's requeue rule can test for it where the exit code does not survive
            text = json.dumps({"step": self.step, "checkpoint": str(path), "resume": resume}, indent=1) + "\n"
            write_text_within(self.run_dir, "run", self.run_dir / STOPPED_FILE, text)
        barrier()  # every rank exits only once the checkpoint is on disk
        raise TrainingInterrupted(
            f"stopped by {self.signals.requested or 'a signal on another rank'} after step {self.step}/{self.total_steps}; "
            f"checkpoint: {path}. Resume with: {resume}"
            if self.dist.is_main
            else ""
        )

    def save_checkpoint(self, asynchronous: bool = False) -> Path:
        """Checkpoint this step; with `asynchronous` the shards are written in the background and the checkpoint
        is completed by `finish_checkpoint` once every rank's are on disk."""
        with self.long_waits():  # rank 0 writes parts of it while the others wait
            return self._save_checkpoint(asynchronous)

    def long_waits(self):
        """Collectives wait ``distributed.startup_timeout_s`` inside (evaluations, saves), then as before."""
        return collective_timeout(self.cfg.distributed.startup_timeout_s, then=self.collective_wait)

    def _save_checkpoint(self, asynchronous: bool) -> Path:
        self.finish_checkpoint(wait=True)
        check_finite_weights(self.policy, self.step, self.device)
        self.logger.sync()  # the metrics up to this checkpoint are on disk before it is
        state = {
            "step": self.step,
            "skipped_steps": self.skipped_steps,
            "world_size": self.dist.world_size,
            "sampler": self.sampler.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "config": config_to_dict(self.cfg),
            "loss": self.loss_fn.state_dict(),
        }
        pending = save_checkpoint(
            self.run_dir,
            self.step,
            self.policy,
            self.optimizer,
            state,
            adapters=self.adapters,
            load_tokenizer=lambda: self.tokenizer,
            keep_last=self.cfg.training.keep_last,
            is_main=self.dist.is_main,
            consolidate=self.step == self.total_steps,  # the full model in HF format once, at the end
            asynchronous=asynchronous,
            write_group=self.checkpoint_group,
        )
        self.last_saved_step, self.last_save_time = self.step, time.monotonic()
        if asynchronous:
            self.pending_checkpoint = pending
            return pending.path
        return pending.wait()

    def finish_checkpoint(self, wait: bool) -> None:
        """Complete a checkpoint written in the background: always with `wait`, else once every rank's shards
        are on disk (all ranks agree, so they complete it together)."""
        pending = self.pending_checkpoint
        if pending is None or (not wait and any_rank([not pending.written()], self.device)[0]):
            return
        self.pending_checkpoint = None
        pending.wait()

    def cleanup(self) -> None:
        if hasattr(self, "process_settings"):
            self.process_settings.close()
        if hasattr(self, "logger"):
            self.logger.close()
        if hasattr(self, "signals"):
            self.signals.restore()
        if hasattr(self, "lock"):
            self.lock.release()
        destroy_distributed()


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def samples_table(first: tuple[int, list[dict]], last: tuple[int, list[dict]]):
    """The policy's replies at the first and the last eval, side by side (``eval.samples``)."""
    from rich.table import Table

    table = Table(title="eval samples")
    table.add_column("prompt", style="bold")
    if first[0] != last[0]:
        table.add_column(f"step {first[0]}")
    table.add_column(f"step {last[0]}", style="green")
    for index, sample in enumerate(last[1]):
        earlier = [first[1][index]["completion"]] if first[0] != last[0] else []
        table.add_row(escape(sample["prompt"]), *map(escape, earlier), escape(sample["completion"]))
    return table


def _summary_rows(result: TrainResult):
    metrics = {**result.train, **{f"eval/{key}": value for key, value in result.eval.items()}}
    for key in (
        "loss",
        "rewards/accuracies",
        "rewards/margins",
        "eval/loss",
        "eval/rewards/accuracies",
        "eval/rewards/margins",
        "kl",
        "pairs_per_s",
        "groups_per_s",
        "examples_per_s",
        "tokens_per_s",
        "peak_memory_mb",
    ):
        if key in metrics:
            yield key, f"{metrics[key]:.4g}"


def run(cfg: TrainConfig) -> TrainResult:
    """Setup, train, save: the whole run for a loaded config (what `main` and library callers use)."""
    recipe = DPORecipe(cfg)
    try:
        recipe.setup()
        result = recipe.train()
        barrier()  # no rank tears the process group down while another still uses it
        return result
    except RuntimeError as exc:  # a hung or lost process: one line naming it, not a traceback per rank
        if is_collective_timeout(exc):
            raise unresponsive_error(exc, cfg.distributed.timeout_s) from exc
        raise
    finally:
        recipe.cleanup()


def main(argv: list[str] | None = None) -> TrainResult:
    """Parse ``--config`` and ``key=value`` overrides, then `run`."""
    return run(parse_recipe_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    code = 0
    try:
        config = parse_recipe_args(sys.argv[1:])
        if not uses_bitsandbytes(config):  # this process runs this one config (a script, or a worker of several)
            block_bitsandbytes_import()
        run(config)
    except TrainingInterrupted as exc:
        if str(exc):
            print(str(exc), file=sys.stderr)
        code = exc.exit_code
    except DpokitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        print_causes(exc)  # at the debug log level: the exceptions behind the line
        code = 1
    if "WORLD_SIZE" in os.environ:  # a worker of several: everything is saved and the group destroyed
        # Skip the interpreter's teardown of torch.distributed's C++ objects, which now and then aborts
        # ("terminate called without an active exception") and would fail a finished run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
