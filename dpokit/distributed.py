"""Process groups and FSDP2: the same code runs in one process, under `--gpus N`, or under torchrun.

Backends: NCCL on CUDA, gloo on CPU (how the tests run every multi-process path). Rank-0-only work
(logging, writing files) checks `DistInfo.is_main` from `init_distributed()`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE env); a no-op in a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        else:
            dist.init_process_group("gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a (possibly peft-wrapped) causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else base.model
    return list(decoder.layers)


def apply_fsdp(model: nn.Module, cfg, device: torch.device) -> nn.Module:
    """FSDP2: shard each decoder layer, the embeddings+norm and the output head, then the root.

    Options (``distributed`` config): ``reshard_after_forward`` (free gathered weights after each
    layer's forward: less memory, one more all-gather in backward), ``cpu_offload`` (keep shards and
    optimizer state in CPU memory) and ``mixed_precision`` (on CUDA: bf16 compute, fp32 reduction).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if cfg.mixed_precision and device.type == "cuda":
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=cfg.reshard_after_forward, **kwargs)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # dpokit calls the decoder and the head directly (chunked log-probs), so each is its own FSDP unit.
    fully_shard(base.get_decoder(), reshard_after_forward=cfg.reshard_after_forward, **kwargs)
    fully_shard(base.get_output_embeddings(), reshard_after_forward=False, **kwargs)
    fully_shard(model, reshard_after_forward=cfg.reshard_after_forward, **kwargs)
    return model
