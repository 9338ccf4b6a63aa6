"""Memory planning: whether a training config fits the GPUs, before any weight is downloaded or loaded.

The model is built from its ``config.json`` on the meta device (no memory behind any tensor) with the
config's method applied (peft adds the LoRA/DoRA adapters on meta too), so parameter counts and the
shapes of every FSDP unit are exact. Bytes per device then follow dpokit's own rules: which dtype each
tensor is stored in (`dpokit.model.training_dtypes`), how FSDP2 shards and gathers it
(`dpokit.distributed.apply_fsdp`), the optimizer's state, the saved activations of a Llama-style decoder
layer at the batch's token count, and the vocabulary projection's chunk (`dpokit.logps.chunk_positions`).
The formulas and their measured accuracy are in docs/distributed.md ("Planning memory").

    dpokit plan --config llama3_1_8b_full_4gpu --gpus 4 --gpu-memory 80GB
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dpokit.config import ADAPTER_METHODS, QUANTIZED_METHODS, TrainConfig, load_config, shipped_configs_dir
from dpokit.errors import DpokitError

DEFAULT_SEQ_LEN = 1024  # tokens per sequence (prompt + completion) when no prepared data is given
DEFAULT_GPU_MEMORY = "80GB"
CUDA_CONTEXT_BYTES = 10**9  # CUDA context and kernels: outside torch's allocator, about 0.5-1 GB
TIGHT_FRACTION = 0.9  # above this share of the GPU, allocator fragmentation may decide it
NF4_BLOCK = 64  # weights per 4-bit quantisation block (bitsandbytes); its absmax is 8-bit with double quantisation
NF4_ABSMAX_BLOCK = 256  # absmax values per fp32 second-level constant (double quantisation)
ADAMW8BIT_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit state for smaller tensors
ADAMW8BIT_BLOCK = 256  # values per fp32 absmax of an 8-bit state
ROLES = {  # which tensor a projection reads, for Llama-style names: projections of one role share their input
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "qkv_proj": "attn_in",
    "o_proj": "attn_out",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "gate_up_proj": "mlp_in",
    "down_proj": "mlp_out",
}

# Hub names whose config.json ships with dpokit (recipes/configs/models/): the shipped configs' models.
SHIPPED_MODEL_CONFIGS = {
    "meta-llama/llama-3.1-8b-instruct": "llama3_1_8b.json",
    "meta-llama/llama-3.1-8b": "llama3_1_8b.json",
    "meta-llama/meta-llama-3.1-8b-instruct": "llama3_1_8b.json",
    "qwen/qwen2.5-0.5b-instruct": "qwen2_5_0_5b.json",
    "qwen/qwen2.5-0.5b": "qwen2_5_0_5b.json",
}

GB = 10**9
SIZE_UNITS = {
    "": GB,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": GB,
    "gb": GB,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_memory_size(text: str, option: str = "--gpu-memory") -> int:
    """``80GB`` -> 80e9 bytes (GB, MB: powers of 10; GiB, MiB: powers of 2; a bare number is GB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match[2].lower() if match else ""
    if not match or unit not in SIZE_UNITS or float(match[1]) <= 0:
        raise DpokitError(
            f"{option} {text!r} is not a memory size; give a positive number and a unit, e.g. 80GB, 24GiB or 40960MiB"
        )
    return int(float(match[1]) * SIZE_UNITS[unit])


# ---------------------------------------------------------------------------------------------
# The model: its config.json, built on the meta device


def model_config_file(model_path: str) -> Path:
    """The config.json to plan for: a local directory or file, a shipped config for a known hub name, or the
    local Hugging Face cache's copy. Nothing is downloaded."""
    if not model_path:
        raise DpokitError(
            "no model to plan for: set model.path in the config or pass --model DIR (a model folder or its config.json)"
        )
    local = Path(model_path).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise DpokitError(
                f"--model {model_path}: the folder has no config.json; give a transformers model folder or a config.json path"
            )
        return local / "config.json"
    shipped = SHIPPED_MODEL_CONFIGS.get(model_path.lower())
    if shipped:
        return shipped_configs_dir() / "models" / shipped
    cached = _hub_cache_config(model_path)
    if cached is not None:
        return cached
    raise DpokitError(
        f"model {model_path!r} is not a local folder, not in the Hugging Face cache and not one whose config dpokit ships "
        f"({', '.join(sorted(set(SHIPPED_MODEL_CONFIGS)))}); `dpokit plan` downloads nothing: pass --model with a local "
        "config.json (e.g. from the model's page on the hub)"
    )


def _hub_cache_config(repo_id: str) -> Optional[Path]:
    """config.json of `repo_id` if the local Hugging Face cache holds it (no network)."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # a malformed repo id: not a hub name
        return None
    return Path(found) if isinstance(found, str) else None


def load_model_config(path: Path):
    """The transformers config of a config.json file."""
    from transformers import AutoConfig

    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DpokitError(f"{path}: not a readable config.json ({exc})") from exc
    if not isinstance(data, dict) or "model_type" not in data:
        raise DpokitError(f"{path}: no model_type; give a transformers model's config.json")
    try:
        return AutoConfig.for_model(data.pop("model_type"), **data)
    except (ValueError, KeyError) as exc:
        raise DpokitError(
            f"{path}: transformers cannot read this config ({exc}); upgrade transformers or pass another --model"
        ) from exc


@dataclass(frozen=True)
class Tensor:
    """One parameter of the planned model: its size, its first dimension (what FSDP2 shards) and role."""

    name: str
    numel: int
    dim0: int
    unit: str  # FSDP unit: "layer", "decoder" (embeddings + final norm), "head" or "root"
    layer: int  # decoder layer index, -1 outside the layers
    trainable: bool
    adapter: bool  # a LoRA/DoRA parameter peft added
    linear_weight: bool  # the weight of a base nn.Linear in a decoder layer (what 4-bit quantisation replaces)
    linear: bool  # a weight or bias of a base nn.Linear (what autocast casts)


@dataclass(frozen=True)
class Adapted:
    """A projection with a LoRA adapter."""

    role: str  # ROLES, or the module's own name for other families
    in_features: int
    out_features: int
    rank: int


@dataclass(frozen=True)
class ModelCensus:
    """What the memory of a model depends on, read off the meta model with the method applied."""

    name: str  # where the config came from
    method_family: str  # "full" or "lora"/"dora"
    tensors: tuple[Tensor, ...]
    adapted: tuple[Adapted, ...]  # per layer (the first layer's adapters)
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layers: int
    tied: bool
    model_type: str

    @property
    def params(self) -> int:
        """Parameters of the model itself (without adapters)."""
        return sum(t.numel for t in self.tensors if not t.adapter)

    @property
    def trainable(self) -> int:
        return sum(t.numel for t in self.tensors if t.trainable)


def model_census(config_path: Path, method: str, lora_cfg) -> ModelCensus:
    """Build the model of `config_path` on the meta device, apply `method` (peft adapters on meta) and count.

    Cached per file, method family, rank and target modules (what the counts depend on): suggestions plan again.
    """
    family = "full" if method not in ADAPTER_METHODS else "dora" if method in ("dora", "qdora") else "lora"
    adapters = (lora_cfg.rank, tuple(lora_cfg.target_modules)) if family != "full" else None
    return _census(str(config_path), Path(config_path).stat().st_mtime_ns, family, adapters)


@functools.lru_cache(maxsize=8)
def _census(
    config_path: str, mtime_ns: int, family: str, adapters: Optional[tuple[int, tuple[str, ...]]]
) -> ModelCensus:
    import torch
    from transformers import AutoModelForCausalLM

    from dpokit.config import LoraConfig
    from dpokit.logps import decoder_and_head

    hf_config = load_model_config(Path(config_path))
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_config(hf_config)
        except (ValueError, KeyError) as exc:
            raise DpokitError(f"{config_path}: not a causal language model transformers can build ({exc})") from exc
        if adapters is not None:
            rank, targets = adapters
            model = _with_adapters(model, LoraConfig(rank=rank, target_modules=list(targets)), family == "dora")
        else:
            model.requires_grad_(True)
    decoder, head = decoder_and_head(model)
    layer_of = {id(p): i for i, layer in enumerate(decoder.layers) for p in layer.parameters()}
    head_ids = {id(p) for p in head.parameters()}
    unit_of = {i: "head" for i in head_ids} | {
        id(p): "decoder" for p in decoder.parameters()
    }  # tied: the embeddings' unit
    tensors = []
    seen = set()
    for module_name, module in model.named_modules():
        base_linear = type(module) is torch.nn.Linear and "lora_" not in module_name and module is not head
        for name, param in module.named_parameters(recurse=False):
            if id(param) in seen:  # tied weights count once
                continue
            seen.add(id(param))
            layer = layer_of.get(id(param), -1)
            tensors.append(
                Tensor(
                    name=f"{module_name}.{name}",
                    numel=param.numel(),
                    dim0=param.shape[0] if param.dim() else 1,
                    unit="layer" if layer >= 0 else unit_of.get(id(param), "root"),
                    layer=layer,
                    trainable=param.requires_grad,
                    adapter="lora_" in module_name,
                    linear_weight=base_linear and name == "weight" and layer >= 0,
                    linear=base_linear or id(param) in head_ids,
                )
            )
    adapted = []
    for module_name, module in decoder.layers[0].named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            base = module.get_base_layer()
            role = ROLES.get(module_name.rsplit(".", 1)[-1], module_name)
            adapted.append(Adapted(role, base.in_features, base.out_features, module.lora_A["default"].out_features))
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = text.num_attention_heads
    return ModelCensus(
        name=str(config_path),
        method_family=family,
        tensors=tuple(tensors),
        adapted=tuple(adapted),
        hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size),
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads,
        head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
        vocab=text.vocab_size,
        layers=len(decoder.layers),
        tied=bool(getattr(hf_config, "tie_word_embeddings", False)),
        model_type=hf_config.model_type,
    )


def _with_adapters(model, lora_cfg, use_dora: bool):
    """peft's adapters on the meta model, exactly as `dpokit.model.load_policy` adds them."""
    from peft import get_peft_model

    from dpokit.model import lora_config

    try:
        return get_peft_model(model, lora_config(lora_cfg, use_dora=use_dora))
    except ValueError as exc:
        raise DpokitError(f"lora.target_modules={lora_cfg.target_modules}: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# The batch: tokens per micro-batch


@dataclass(frozen=True)
class Workload:
    """The largest micro-batch a device runs: every pair as long as the longest."""

    pairs: int  # data.batch_size (pairs, or ranked groups)
    pair_tokens: int  # tokens one example puts through the decoder (its sequences, or its prompt once + completions)
    completion_tokens: int  # of those, completion tokens (where the vocabulary projection runs)
    row_width: int  # longest row (a mask is rows x width x width)
    source: str  # how the lengths were chosen
    layout_attention: bool  # packed / prefix-shared rows wider than `attention.DENSE_MAX_WIDTH`: no mask at all
    rejected_branch: int = (
        0  # prefix sharing: the longest pair's prompt + rejected (its k and v are copied for attention)
    )

    @property
    def tokens(self) -> int:
        return self.pairs * self.pair_tokens


def workload(cfg: TrainConfig, data: Optional[str] = None, seq_len: Optional[int] = None) -> Workload:
    """Tokens per micro-batch from prepared `data` (its longest pair) or from `seq_len` tokens per sequence.

    Without data the prompt length is unknown, so prefix sharing is assumed to save nothing: a pair is
    2 x seq_len tokens, all of them completion tokens (an upper bound).
    """
    pairs = cfg.data.batch_size
    pack = cfg.data.pack_length or 0
    if data is not None:
        import numpy as np

        from dpokit.data.prepared import group_token_counts, load_prepared, pair_lengths, pair_token_counts

        prepared = load_prepared(data)
        split = prepared.split("train")
        if prepared.is_grouped:  # k completions per prompt (unpaired: 2): a group is one segment, or k sequences
            prompt, tokens, sizes = group_token_counts(split)
            firsts = np.cumsum(sizes) - sizes
            group_completions = np.add.reduceat(tokens, firsts) if len(sizes) else sizes
            first_completion = tokens[firsts] if len(sizes) else sizes
            sequences = sizes  # sequences per example in the unshared layouts
            # the branches after the first copy their [prompt; branch] keys and values
            branches = (sizes - 1) * prompt + group_completions - first_completion
        else:
            prompt, chosen, rejected = pair_token_counts(split)
            group_completions, sequences, branches = chosen + rejected, np.full(len(prompt), 2), prompt + rejected
        if len(prompt) == 0:
            raise DpokitError(f"--data {data}: the train split has no examples")
        longest = int(pair_lengths(split).max())  # the one example length of every batching rule
        whole = prompt + group_completions  # an example's tokens with its prompt once
        shared = int(whole.max())
        completions = int(group_completions.max())
        branch = int(branches[int(whole.argmax())])  # of the longest example
        unshared = int(sequences.max()) * longest  # every sequence of the largest example as long as the longest
        what = "prompt + its completions" if prepared.is_grouped else "prompt + chosen + rejected"
        source = f"the longest example of {data} (sequence {longest} tokens, {what} {shared})"
    else:
        if seq_len is not None and seq_len < 2:
            raise DpokitError(f"--seq-len must be at least 2, got {seq_len}")
        longest = seq_len or DEFAULT_SEQ_LEN
        shared = completions = unshared = 2 * longest
        branch = longest
        source = (
            f"--seq-len {longest} tokens per sequence (no --data: prompt length unknown, prefix sharing not counted)"
        )
    from dpokit.attention import DENSE_MAX_WIDTH

    width = max(pack if cfg.data.packing else 0, shared if cfg.data.prefix_sharing else longest)
    # The kernel that will run: packed rows wider than DENSE_MAX_WIDTH take the layout attention (no mask).
    layout = (cfg.data.packing or cfg.data.prefix_sharing) and (
        width > DENSE_MAX_WIDTH or cfg.model.attn_implementation == "flex_attention"
    )
    if cfg.data.prefix_sharing:
        return Workload(pairs, shared, completions, width, source, layout, branch)
    return Workload(pairs, unshared, completions, width, source, layout)


# ---------------------------------------------------------------------------------------------
# The estimate


PHASES = {
    "held": "held through the whole step",
    "start": "at the start of backward",
    "end": "by the end of backward",
    "layer": "the layer in backward (both ends)",
    "transient": "one at a time, at the start of backward (the largest counts, against the layer in backward)",
}


@dataclass(frozen=True)
class Row:
    """One line of the plan: bytes on each device (and in host memory), when they exist, how they were computed."""

    label: str
    device: int
    phase: str  # PHASES: the peak is `held` + the larger of the start and the end of backward
    how: str = ""
    host: int = 0


@dataclass
class MemoryPlan:
    """Bytes per device of a training run, by component, against the memory of one GPU."""

    config: str
    model: str
    params: int
    trainable: int
    world_size: int
    device_type: str
    gpu_memory: int
    workload: Workload
    rows: list[Row]
    notes: list[str] = field(default_factory=list)
    suggestions: list[tuple[str, int]] = field(default_factory=list)  # (change, total bytes per device with it)

    def bytes(self, label: str) -> int:
        """The device bytes of the row `label` (0 if the plan has none)."""
        return sum(r.device for r in self.rows if r.label == label)

    def _phase(self, phase: str) -> int:
        return sum(r.device for r in self.rows if r.phase == phase)

    @property
    def peaks(self) -> dict[str, int]:
        """Bytes at the start of backward (every saved activation, the head's logits or a layer in flight)
        and at its end (every gradient, a layer in flight)."""
        held, layer = self._phase("held"), self._phase("layer")
        transient = max([r.device for r in self.rows if r.phase == "transient"], default=0)
        return {"start": held + self._phase("start") + max(layer, transient), "end": held + self._phase("end") + layer}

    @property
    def total(self) -> int:
        """The estimated peak per device."""
        return max(self.peaks.values())

    @property
    def host(self) -> int:
        return sum(r.host for r in self.rows)

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    @property
    def verdict(self) -> str:
        share = self.total / self.gpu_memory
        if share > 1:
            return "does not fit"
        return "fits, tightly" if share > TIGHT_FRACTION else "fits"


@dataclass(frozen=True)
class Dtypes:
    """Bytes per element of what a run stores and computes in."""

    stored: int  # the trainable weights (full) or the frozen base (adapters)
    compute: int  # the compute dtype (model.dtype)
    activation: int  # activations: outputs of the projections (fp32 under QLoRA: peft's k-bit preparation)
    residual: int  # the residual stream and norm outputs (fp32 under autocast and QLoRA's fp32 embeddings)
    adapter: int  # the adapters' weights, gradients and state
    adapter_compute: int  # the dtype adapters compute in (the mixed-precision policy casts them under FSDP)
    gathered: int  # FSDP's all-gathered copies
    autocast: bool  # one process, fp32 master weights: each projection casts its input and its weight


def _dtypes(cfg: TrainConfig, device_type: str, world_size: int) -> Dtypes:
    import torch

    from dpokit.model import training_dtypes

    params_dtype, compute_dtype = training_dtypes(cfg.model, torch.device(device_type), planned=True)
    stored, compute = params_dtype.itemsize, compute_dtype.itemsize
    fsdp_cast = world_size > 1 and cfg.distributed.mixed_precision and compute < 4
    if world_size > 1 and stored != compute and not fsdp_cast:
        raise DpokitError(
            "model.precision=mixed under FSDP needs distributed.mixed_precision=true (or model.precision=pure)"
        )
    autocast = world_size == 1 and stored != compute
    quantized = cfg.model.method in QUANTIZED_METHODS
    residual = 4 if (autocast or quantized) else compute  # peft's prepare_model_for_kbit_training makes the rest fp32
    return Dtypes(
        stored=stored,
        compute=compute,
        activation=4 if quantized else compute,
        residual=residual,
        adapter=4,
        adapter_compute=compute if fsdp_cast else 4,
        gathered=compute if fsdp_cast else stored,
        autocast=autocast,
    )


def _shard(numel: int, dim0: int, world_size: int) -> int:
    """Elements of a tensor on rank 0 under FSDP2: dim 0 split into `world_size` padded chunks."""
    if world_size == 1:
        return numel
    return math.ceil(dim0 / world_size) * (numel // max(dim0, 1))


def nf4_bytes(numel: int) -> int:
    """A 4-bit NF4 weight with double quantisation: half a byte per weight, an 8-bit absmax per 64 weights,
    an fp32 constant per 256 absmax values, and the 256-entry fp32 code of the second level."""
    blocks = math.ceil(numel / NF4_BLOCK)
    return numel // 2 + blocks + 4 * math.ceil(blocks / NF4_ABSMAX_BLOCK) + 4 * 256


def adamw_state_bytes(numel: int, state_bytes: int, eight_bit: bool) -> int:
    """Both AdamW moments of one tensor and its fp32 step (8-bit: uint8 moments with an fp32 absmax per 256)."""
    if eight_bit:
        if numel < ADAMW8BIT_MIN_SIZE:
            return 2 * 4 * numel
        return 2 * numel + 2 * 4 * math.ceil(numel / ADAMW8BIT_BLOCK)
    return 2 * state_bytes * numel + 4


def layer_activation_bytes(
    census: ModelCensus, dt: Dtypes, full: bool, row_width: int, layout_attention: bool = False
) -> int:
    """Bytes one decoder layer saves for backward per token (a Llama-style layer: RMSNorm, SDPA attention,
    gated MLP), as measured with saved-tensor hooks (tests/test_plan.py), by the attention kernel that runs:

    - each RMSNorm keeps an fp32 copy of its input and 1/rms (4h + 4); with a trainable norm weight also its
      normalised input (r bytes x h, r the residual dtype);
    - trainable projections keep their input once per input (full: s(2h + i); under autocast each projection
      casts its own copy of an fp32 input: s(5h + i)); LoRA adapters keep their input (a copy per adapter
      when the adapter's dtype differs) and their rank-r output; DoRA also its base and LoRA outputs;
    - padded rows, and packed rows of at most `attention.DENSE_MAX_WIDTH` (a mask): attention keeps q, k and v (k and v repeated to every head: a mask
      rules out SDPA's GQA path), its output, a float32 logsumexp per head and its own float copy of the mask
      (s x row width);
    - packed / prefix-shared rows (`dpokit.attention`, causal kernels on each pair's problems, no mask): q, k and
      v at their own head counts, each problem's output, a float32 logsumexp per head, and the row's output when
      the o projection keeps its input (full fine-tuning, or an adapter on it that needs no cast copy); the rejected branch's copies of its prompt's and own k and v are counted per
      pair by `estimate` (`Workload.rejected_branch`);
    - the gated MLP keeps the gate output, its SiLU and the up projection (3 s i).
    """
    h, i, s, r = census.hidden, census.intermediate, dt.activation, dt.residual
    q = census.heads * census.head_dim
    norms = 2 * (4 * h + 4) + (2 * r * h if full else 0)
    cast = dt.adapter_compute != s
    if layout_attention:
        kv = census.kv_heads * census.head_dim
        attention = s * (q + 2 * kv + q) + 4 * census.heads
        # The row's output is a tensor of its own (not a problem's output): kept when the o projection needs it.
        if full or (not cast and any(adapter.role == "attn_out" for adapter in census.adapted)):
            attention += s * q
    else:
        attention = s * (q + 2 * q + q) + 4 * census.heads + s * row_width
    mlp = 3 * s * i
    inputs = 0
    if full:
        inputs = s * (5 * h + i) if dt.autocast else s * (2 * h + i)
    widths = {"attn_in": h, "attn_out": q, "mlp_in": h, "mlp_out": i}
    kept_inputs = set()
    for adapter in census.adapted:
        if cast:
            inputs += dt.adapter_compute * adapter.in_features
        elif not full and adapter.role != "attn_out" and adapter.role not in kept_inputs:  # attn_out: SDPA keeps it
            kept_inputs.add(adapter.role)
            inputs += s * widths.get(adapter.role, adapter.in_features)
        inputs += dt.adapter_compute * adapter.rank
        if census.method_family == "dora":
            inputs += (s + dt.adapter_compute) * adapter.out_features
    return norms + inputs + attention + mlp


def backward_scratch_bytes(census: ModelCensus, dt: Dtypes) -> int:
    """Gradients in flight inside one layer's backward, per token: the residual stream's gradient (twice) and
    one MLP-wide gradient (fitted to allocator peaks measured on CPU: docs/distributed.md)."""
    return 2 * dt.residual * census.hidden + dt.activation * census.intermediate


def estimate(
    census: ModelCensus,
    cfg: TrainConfig,
    load: Workload,
    world_size: int = 1,
    device_type: str = "cuda",
    gpu_memory: int = 80 * GB,
    config_name: str = "",
) -> MemoryPlan:
    """Bytes per device of training `cfg` on `census`'s model with `world_size` processes (FSDP2 when > 1)."""
    import torch

    from dpokit.logps import chunk_positions
    from dpokit.losses import build_loss, is_reference_free

    dt = _dtypes(cfg, device_type, world_size)
    method = cfg.model.method
    full = method == "full"
    quantized = method in QUANTIZED_METHODS
    n = world_size
    fsdp = n > 1
    offload = fsdp and cfg.distributed.cpu_offload
    accumulation = cfg.training.gradient_accumulation_steps
    eight_bit = cfg.optimizer.name == "adamw8bit"
    h, V = census.hidden, census.vocab
    where = f"/ {n} GPUs (FSDP2 shards)" if fsdp else "on one device"
    rows: list[Row] = []
    notes: list[str] = []

    def stored_bytes(t: Tensor) -> int:
        if t.trainable:
            return (dt.stored if full else dt.adapter) * _shard(t.numel, t.dim0, n)
        if quantized and t.linear_weight:
            return nf4_bytes(t.numel)
        return (4 if quantized else dt.stored) * _shard(t.numel, t.dim0, n)

    def unit_sizes(trainable_only: bool) -> dict[str, int]:
        sizes: dict[str, int] = {}
        for t in census.tensors:
            if t.trainable or not trainable_only:
                key = f"layer{t.layer}" if t.unit == "layer" else t.unit
                sizes[key] = sizes.get(key, 0) + t.numel
        return sizes

    # Weights as stored (each rank's shard under FSDP2; host memory with cpu_offload).
    weights = sum(stored_bytes(t) for t in census.tensors)
    if full:
        how = f"{census.params:,} params x {dt.stored} B ({'fp32 master weights' if dt.stored == 4 else '16-bit'}) {where}"
    elif quantized:
        how = (
            f"4-bit NF4 base (~{nf4_bytes(2**20) / 2**20:.3f} B/param: {NF4_BLOCK}-weight blocks, 8-bit absmax, "
            f"double quantisation); embeddings, head and norms fp32 (peft's k-bit preparation); "
            f"{census.trainable:,} adapter params x 4 B"
        )
    else:
        how = f"{census.params:,} frozen params x {dt.stored} B + {census.trainable:,} adapter params x 4 B {where}"
    rows.append(Row("weights (stored)", 0 if offload else weights, "held", how, weights if offload else 0))

    # Working copies: FSDP's gathered units, autocast's cached casts, dequantised 4-bit weights, DoRA's norms.
    units = unit_sizes(trainable_only=False)
    largest_layer = max((v for k, v in units.items() if k.startswith("layer")), default=0)
    working, how = 0, "none: one process computes with the stored weights"
    if fsdp and cfg.distributed.reshard_after_forward:
        working = dt.gathered * (units.get("decoder", 0) + units.get("head", 0) + 2 * largest_layer)
        how = (
            f"all-gathered {8 * dt.gathered}-bit units: embeddings+norm and head (held through forward and "
            "backward) + 2 decoder layers (current + prefetched)"
        )
    elif fsdp:
        working = dt.gathered * sum(units.values())
        how = f"all-gathered {8 * dt.gathered}-bit copies of every unit (reshard_after_forward=false keeps them until backward)"
    elif dt.autocast:
        working = dt.compute * sum(t.numel for t in census.tensors if t.linear)
        how = f"autocast's cached {8 * dt.compute}-bit copies of every projection's weights (fp32 master weights, one process)"
    if quantized:
        working += 2 * max((t.numel for t in census.tensors if t.linear_weight), default=0)
        how = "the largest 4-bit weight dequantised to 16 bits for its matmul"
    if census.method_family == "dora" and census.adapted:
        working += max(
            dt.adapter_compute * (m.in_features**2 + 3 * m.in_features * m.out_features) for m in census.adapted
        )
        how += "; DoRA's weight norm: the largest adapted weight 3 times and an identity of its input size, in the adapter dtype"
    rows.append(Row("weights (working copies)", working, "held", how))

    # Optimizer state.
    state_bytes = dt.stored if full else dt.adapter
    trainable = [t for t in census.tensors if t.trainable]
    optimizer = sum(adamw_state_bytes(_shard(t.numel, t.dim0, n), state_bytes, eight_bit) for t in trainable)
    how = (
        "AdamW8bit (bitsandbytes): 2 x 1 B + an fp32 absmax per 256 values, per trainable param"
        if eight_bit
        else f"AdamW: 2 moments x {state_bytes} B per trainable param"
    )
    rows.append(
        Row("optimizer state", 0 if offload else optimizer, "held", f"{how} {where}", optimizer if offload else 0)
    )

    # Gradients: one per trainable parameter in its stored dtype, sharded like it. Without accumulation they
    # appear during backward as the activations go; with it, they are there through the next forward.
    grad_bytes = dt.stored if full else dt.adapter
    grads = sum(grad_bytes * _shard(t.numel, t.dim0, n) for t in trainable)
    accumulated = accumulation > 1 and not fsdp
    how = f"{census.trainable:,} trainable x {grad_bytes} B {where}"
    if accumulated:
        how += f"; kept between the {accumulation} micro-batches of a step"
    rows.append(
        Row("gradients", 0 if offload else grads, "held" if accumulated else "end", how, grads if offload else 0)
    )
    head_units = unit_sizes(trainable_only=True)
    head_grad = head_units.get("head", 0)  # the first gradient backward makes (a trainable head)
    if fsdp:
        reduce_extra = 4 if dt.gathered < 4 else 0  # reduce_dtype=fp32 under the mixed-precision policy
        largest_unit = max(head_units.values(), default=0)
        rows.append(
            Row(
                "gradient reduce-scatter (FSDP)",
                largest_unit * (dt.gathered + reduce_extra),
                "end",
                f"the largest trainable unit's unsharded gradient ({8 * dt.gathered}-bit)"
                + (" and its fp32 copy for the reduce-scatter" if reduce_extra else ""),
            )
        )
        head_grad *= dt.gathered + reduce_extra
        if accumulation > 1:
            kept = 4 if reduce_extra else grad_bytes
            rows.append(
                Row(
                    "gradients between micro-steps (FSDP)",
                    census.trainable * kept,
                    "held",
                    f"training.gradient_accumulation_steps={accumulation}: without a reduce-scatter per micro-step, FSDP2 keeps "
                    f"every unsharded gradient in {8 * kept}-bit ({census.trainable:,} x {kept} B)",
                )
            )
    else:
        head_grad *= grad_bytes
    if head_grad:
        rows.append(
            Row("head gradient", head_grad, "start", "the output head's gradient, the first one backward makes")
        )

    # Reference: a frozen copy on every device when it runs live and is not the policy with adapters off.
    live_reference = not is_reference_free(build_loss(cfg.loss, shape=None)) and cfg.reference.source == "live"
    if live_reference and (full or cfg.reference.adapter):
        rows.append(
            Row(
                "reference model (live)",
                dt.compute * census.params,
                "held",
                f"a frozen {8 * dt.compute}-bit copy, whole on every device",
            )
        )

    # Activations: what the forward saves, and the layer whose backward runs.
    tokens = load.tokens
    completion = min(tokens, load.pairs * load.completion_tokens)
    per_layer = layer_activation_bytes(census, dt, full, load.row_width, load.layout_attention)
    scratch = backward_scratch_bytes(census, dt)
    checkpointing = cfg.model.activation_checkpointing
    offloading = cfg.model.activation_offloading and device_type == "cuda"
    layer_inputs = census.layers * dt.residual * h
    mask = 0 if load.layout_attention else load.row_width  # a boolean [L, L] mask per row
    shared = mask + 2 * census.head_dim * dt.residual + 4 * h + 4 + (8 + dt.residual * h if full else 0)
    saved = (layer_inputs if checkpointing else census.layers * per_layer) * tokens + shared * tokens
    if load.layout_attention and not checkpointing:  # each pair's [prompt; rejected] keys and values, copied
        saved += (
            census.layers * 2 * dt.activation * census.kv_heads * census.head_dim * load.pairs * load.rejected_branch
        )
    if not full and not checkpointing:  # frozen embeddings: the first norm's input needs no gradient, nothing kept
        saved -= (4 * h + 4) * tokens
    saved += (dt.residual * h + 16) * completion  # the final hidden states the head reads, and their indices
    layout = "prompt + chosen + rejected" if cfg.data.prefix_sharing else "chosen and rejected sequences"
    how = (
        f"{load.pairs} pairs x {load.pair_tokens:,} tokens ({layout}) = {tokens:,} tokens x "
        + (
            f"{census.layers} layer inputs of {dt.residual * h:,} B (checkpointing)"
            if checkpointing
            else f"{census.layers} layers x {per_layer:,} B ({per_layer / h:.1f} x hidden)"
        )
        + (", attention from the layout's segments (no mask)" if load.layout_attention else ", + the mask")
        + ", rotary tables and the final norm"
    )
    if offloading:
        how += "; activation_offloading: they wait in host memory"
    rows.append(Row("activations (saved)", 0 if offloading else saved, "start", how, saved if offloading else 0))
    in_flight = ((per_layer if checkpointing or offloading else 0) + scratch) * tokens
    how = (
        (
            f"recomputed: {per_layer:,} B per token ({per_layer / h:.1f} x hidden)"
            if checkpointing
            else f"brought back from host memory: {per_layer:,} B per token"
            if offloading
            else ""
        )
        + ("; " if checkpointing or offloading else "")
        + f"gradients inside the layer: {scratch:,} B per token"
    )
    rows.append(Row("activations (layer in backward)", in_flight, "layer", how))

    if live_reference:
        forward = (3 * dt.activation * census.intermediate + 2 * dt.residual * h) * tokens
        rows.append(
            Row(
                "reference forward (live)",
                forward,
                "transient",
                "no-grad forward after the policy's: one layer's MLP and residual stream in flight per token",
            )
        )

    # The vocabulary projection: one chunk of float32 logits (and its 16-bit twin) at a time.
    chunk = min(chunk_positions(V, torch.device(device_type), cfg.data.logps_chunk_size), completion)
    # A plain head (one process, no autocast, not 4-bit) keeps its softmax for backward when one chunk holds
    # every completion token (`dpokit.logps.FusedChunkLogps`).
    if world_size == 1 and not dt.autocast and cfg.model.method not in QUANTIZED_METHODS and completion <= chunk:
        rows.append(
            Row(
                "softmax kept for backward",
                completion * V * 4,
                "start",
                f"{completion:,} completion tokens fit one logits chunk: its float32 softmax waits for backward",
            )
        )
    twin = dt.activation if dt.activation < 4 else 0
    budget = (
        "data.logps_chunk_size"
        if cfg.data.logps_chunk_size
        else f"the {device_type} byte budget (dpokit.logps.CHUNK_BYTES)"
    )
    rows.append(
        Row(
            "logits (one chunk)",
            chunk * V * (4 + twin),
            "transient",
            f"{chunk:,} positions (from {budget}) x {V:,} vocabulary x (4 B fp32{f' + {twin} B' if twin else ''})",
        )
    )

    if device_type == "cuda":
        rows.append(Row("CUDA context", CUDA_CONTEXT_BYTES, "held", "outside torch's allocator; about 0.5-1 GB"))

    if world_size == 1 and cfg.distributed.cpu_offload:
        notes.append("distributed.cpu_offload applies to FSDP2 only: with one process it changes nothing")
    if cfg.model.activation_offloading and device_type != "cuda":
        notes.append(
            "model.activation_offloading works on CUDA only: on CPU the activations already live in host memory"
        )
    if not _is_llama_like(census):
        notes.append(f"activations use a Llama-style layer's formula; {census.model_type} may differ")
    return MemoryPlan(
        config=config_name,
        model=census.name,
        params=census.params,
        trainable=census.trainable,
        world_size=world_size,
        device_type=device_type,
        gpu_memory=gpu_memory,
        workload=load,
        rows=rows,
        notes=notes,
    )


def _is_llama_like(census: ModelCensus) -> bool:
    names = {part for t in census.tensors if t.linear_weight for part in t.name.split(".")}
    return {"q_proj", "o_proj", "gate_proj", "down_proj"} <= names


# ---------------------------------------------------------------------------------------------
# The command


def plan_memory(
    config: Optional[str],
    overrides: list[str],
    model: Optional[str] = None,
    gpus: int = 1,
    gpu_memory: Optional[str] = None,
    data: Optional[str] = None,
    seq_len: Optional[int] = None,
    device_type: str = "cuda",
) -> MemoryPlan:
    """`dpokit plan`: the config (with overrides) on `gpus` processes; with what to change if it does not fit.

    Args:
        gpu_memory: one GPU's memory, e.g. ``80GB`` (`parse_memory_size`; default `DEFAULT_GPU_MEMORY`).
        data: prepared data whose longest pair sets the batch's tokens; else `seq_len` (default `DEFAULT_SEQ_LEN`).
    """
    if gpus < 1:
        raise DpokitError(f"--gpus must be at least 1, got {gpus}")
    if device_type not in ("cuda", "cpu"):
        raise DpokitError(f"--device {device_type!r} is not supported; choose cuda or cpu")
    memory = parse_memory_size(gpu_memory or DEFAULT_GPU_MEMORY)
    cfg = load_config(config, overrides, world_size=gpus)
    path = model_config_file(model or cfg.model.path)
    census = model_census(path, cfg.model.method, cfg.lora)
    load = workload(cfg, data, seq_len)
    name = config or "defaults"
    plan = estimate(census, cfg, load, gpus, device_type, memory, name)
    if not plan.fits:
        plan.suggestions = suggestions(plan, path, config, overrides, cfg, data, seq_len)
    return plan


def suggestions(
    plan: MemoryPlan,
    path: Path,
    config: Optional[str],
    overrides: list[str],
    cfg: TrainConfig,
    data: Optional[str],
    seq_len: Optional[int],
) -> list[tuple[str, int]]:
    """Changes that lower `plan`'s peak, each planned on its own: (change, peak bytes per device), smallest first."""
    gpus, device_type = plan.world_size, plan.device_type
    candidates: list[tuple[str, list[str], int]] = []
    if not cfg.model.activation_checkpointing:
        candidates.append(("model.activation_checkpointing=true", ["model.activation_checkpointing=true"], gpus))
    if cfg.data.batch_size > 1:
        half = cfg.data.batch_size // 2
        accumulate = cfg.training.gradient_accumulation_steps * cfg.data.batch_size // half
        change = [f"data.batch_size={half}", f"training.gradient_accumulation_steps={accumulate}"]
        candidates.append((" ".join(change) + " (same global batch)", change, gpus))
    if gpus > 1 and cfg.training.gradient_accumulation_steps > 1:
        steps = cfg.training.gradient_accumulation_steps
        change = [f"data.batch_size={cfg.data.batch_size * steps}", "training.gradient_accumulation_steps=1"]
        candidates.append((" ".join(change) + " (no unsharded gradients held between micro-steps)", change, gpus))
    if cfg.model.method not in QUANTIZED_METHODS:
        candidates.append((f"--gpus {2 * gpus}", [], 2 * gpus))
    if gpus > 1 and not cfg.distributed.cpu_offload:
        candidates.append(("distributed.cpu_offload=true", ["distributed.cpu_offload=true"], gpus))
    if device_type == "cuda" and not cfg.model.activation_offloading:
        candidates.append(("model.activation_offloading=true", ["model.activation_offloading=true"], gpus))
    if cfg.model.method == "full" and cfg.model.precision == "mixed":
        candidates.append(
            ("model.precision=pure (updates below bf16's spacing round away)", ["model.precision=pure"], gpus)
        )
    if cfg.model.method == "full":
        candidates.append(("model.method=lora", ["model.method=lora"], gpus))
    elif cfg.model.method in ("lora", "dora") and gpus == 1:
        candidates.append((f"model.method=q{cfg.model.method}", [f"model.method=q{cfg.model.method}"], gpus))
    results = []
    for label, change, world in candidates:
        try:
            changed = load_config(config, [*overrides, *change], world_size=world)
            census = model_census(
                path, changed.model.method, changed.lora
            )  # cached: built again only for another method
            total = estimate(
                census, changed, workload(changed, data, seq_len), world, device_type, plan.gpu_memory
            ).total
        except DpokitError:
            continue
        if total < plan.total:
            results.append((label, total))
    return sorted(results, key=lambda item: item[1])


def _gb(value: int) -> str:
    return f"{value / GB:,.2f} GB"


def plan_report(plan: MemoryPlan):
    """The plan as rich renderables: a table of per-device bytes, the verdict, and what to change."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    unit = "GPU" if plan.device_type == "cuda" else "process"
    title = (
        f"{escape(plan.config)} on {plan.world_size} {unit}{'s' if plan.world_size > 1 else ''}: "
        f"{plan.params:,} parameters, {plan.trainable:,} trainable"
    )
    table = Table(
        title=title, caption=escape(f"model: {plan.model}; batch: {plan.workload.source}"), caption_justify="left"
    )
    table.add_column(f"per {unit}")
    table.add_column("memory", justify="right")
    table.add_column("when")
    if plan.host:
        table.add_column("host memory", justify="right")
    table.add_column("how", overflow="fold")
    for row in plan.rows:
        host = [_gb(row.host) if row.host else ""] if plan.host else []
        table.add_row(row.label, _gb(row.device), row.phase, *host, escape(row.how))
    table.add_section()
    peaks = plan.peaks
    phase = max(peaks, key=peaks.get)
    parts = (
        "saved activations, head gradient and the largest of the layer in backward and the transients"
        if phase == "start"
        else "gradients and the layer in backward"
    )
    table.add_row(
        "[bold]peak[/]",
        f"[bold]{_gb(plan.total)}[/]",
        phase,
        *([_gb(plan.host)] if plan.host else []),
        f"{PHASES[phase]}: the held rows + {parts} (the other end: {_gb(min(peaks.values()))})",
    )
    colour = {"fits": "green", "fits, tightly": "yellow"}.get(plan.verdict, "red")
    lines = [
        table,
        Text.from_markup(
            f"[bold {colour}]{plan.verdict}[/]: {_gb(plan.total)} of {_gb(plan.gpu_memory)} per {unit} "
            f"({100 * plan.total / plan.gpu_memory:.0f}%)"
        ),
    ]
    lines += [Text(f"note: {note}") for note in plan.notes]
    if plan.suggestions:
        lines.append(Text("what would change it (each planned on its own):"))
        for change, total in plan.suggestions:
            mark = "fits" if total <= plan.gpu_memory else "still too large"
            lines.append(Text(f"  {change}: {_gb(total)} ({mark})"))
    return Group(*lines)
