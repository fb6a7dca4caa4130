"""Multi-process training on PyTorch's own engine: torchrun, DDP and FSDP2.

`torchrun --nproc_per_node=N -m neoxlab train ...` starts N copies of the trainer; each reads its
rank from the environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK) and joins one process
group (NCCL on GPUs, gloo on CPUs). Two ways to share the work:

- DDP: every rank holds the whole model; gradients are all-reduced once per optimizer step
  (`no_sync` on every micro-batch but the last).
- FSDP2 (`distributed: fsdp`, or gpt-neox's `zero_optimization.stage` >= 1): `fully_shard` on each
  transformer block and on the root, so parameters, gradients and optimizer state are split
  across ranks; a mixed-precision policy casts parameters to the run's precision for compute and
  reduces gradients in fp32.
- CPU offload (DeepSpeed's `offload_optimizer: {device: cpu}`): FSDP2 with a CPUOffloadPolicy, on
  any number of processes, one included (a process group of one). Parameters, gradients and the
  optimizer state live in host memory and the optimizer steps there; each block's parameters
  visit the GPU, in the compute dtype, only while that block computes.

Checkpoints hold full (unsharded) state: every rank joins the gather, rank 0 writes the same
folder a single-process run writes, so any world size resumes from it. Loading goes the other
way: rank 0 reads the files and the state is broadcast (and sharded) to the other ranks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.nn.parallel import DistributedDataParallel

from neoxlab.errors import NeoxlabError


@dataclass(frozen=True)
class World:
    """This process's place among the processes of a run (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_from_environment() -> World:
    """The rank torchrun (or Slurm through torchrun) gave this process; no process group yet."""
    try:
        return World(
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError as err:
        raise NeoxlabError(f"RANK / WORLD_SIZE / LOCAL_RANK are not integers: {err}") from None


def init_world(
    device: torch.device, timeout: timedelta, offload: bool = False
) -> tuple[World, torch.device]:
    """Join the process group when started by torchrun; returns the world and this rank's device.

    Each rank of a node drives the GPU numbered by its LOCAL_RANK. `timeout` bounds every
    collective: a rank whose peer stops answering without closing its connections (a node
    that lost power or network, a frozen process) fails after it instead of waiting forever.
    A peer that dies on a reachable host is noticed at once (its connections close).
    """
    world = world_from_environment()
    if offload and not dist.is_initialized():
        # FSDP2 needs a process group, also for one process; CPU tensors go through gloo.
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        if not world.distributed:
            store = dist.HashStore()
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
            return world, device
    if not world.distributed:
        return world, device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise NeoxlabError(
                f"local rank {world.local_rank} has no GPU: this node has "
                f"{torch.cuda.device_count()}",
                hint="start at most one process per GPU (torchrun --nproc_per_node)",
            )
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise NeoxlabError(f"distributed training runs on cuda or cpu, not {device.type}")
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if offload and device.type == "cuda" else None
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend, timeout=timeout)
    return world, device


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def build_sharded(
    build: Callable[[torch.device], nn.Module],
    world: World,
    device: torch.device,
    dtype: torch.dtype,
    offload: bool = False,
) -> nn.Module:
    """The model sharded by FSDP2, with exactly the weights a single process would initialise.

    Rank 0 builds the full model on the CPU (the same seed gives the same init as one process);
    every rank builds it on the meta device (no memory), shards it per block, allocates only its
    own shards on `device` (host memory with `offload`), and receives them from rank 0.
    """
    full = build(torch.device("cpu")) if world.is_main else None
    with torch.device("meta"):
        model = build(torch.device("meta"))
    # Compute in the run's precision, reduce gradients in fp32 (exact sums across ranks).
    policy = MixedPrecisionPolicy(
        param_dtype=None if dtype == torch.float32 else dtype, reduce_dtype=torch.float32
    )
    # pinned host memory: copies to and from the GPU overlap with compute
    offload_policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else None
    options = {"mp_policy": policy, "offload_policy": offload_policy or OffloadPolicy()}
    for block in model.gpt_neox.layers:
        fully_shard(block, **options)
    fully_shard(model, **options)  # the root unit: embeddings, final norm, head
    model.to_empty(device="cpu" if offload else device)
    weights = full.state_dict() if full is not None else {}
    state_options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, weights, options=state_options)
    # Rank 0 alone drew the initial weights from the RNG. Every rank continues from its state,
    # as every rank of a DDP run does: so the one state a checkpoint keeps (rank 0's) resumes
    # each rank exactly, dropout masks included.
    torch.set_rng_state(broadcast_from_main(torch.get_rng_state(), world))
    return model


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """A DDP wrapper: replicas stay equal by all-reducing gradients once per optimizer step."""
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce (DDP) or reduce-scatter (FSDP) on all but the last
    micro-batch of a step: gradients accumulate locally and are reduced once."""
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper holds the DDP/FSDP one
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def mean_across_ranks(value: torch.Tensor, world: World) -> torch.Tensor:
    """The mean of a scalar over all ranks (itself in a single process)."""
    if not world.distributed:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / world.world_size


def max_across_ranks(value: torch.Tensor, world: World) -> torch.Tensor:
    """The maximum of a scalar over all ranks; on GPUs the all-reduce is queued, not awaited."""
    if not world.distributed:
        return value
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return total


def broadcast_from_main(value: Any, world: World) -> Any:
    """Rank 0's value of a small picklable object (e.g. the run directory it created)."""
    if not world.distributed:
        return value
    holder = [value if world.is_main else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def decided_by_main(decide: Callable[[], Any], world: World) -> Any:
    """What `decide()` returns on rank 0, on every rank (it runs on rank 0 alone). A
    NeoxlabError it raises is raised on every rank, so that all stop with the same message."""
    if not world.distributed:
        return decide()
    outcome = None
    if world.is_main:
        try:
            outcome = ("value", decide())
        except NeoxlabError as err:
            outcome = ("error", err.message, err.hint)
    outcome = broadcast_from_main(outcome, world)
    if outcome[0] == "error":
        raise NeoxlabError(outcome[1], hint=outcome[2])
    return outcome[1]


# What gloo's collectives say when another rank is gone (its connections closed, or nothing came
# back within distributed-timeout); they raise it as a plain RuntimeError from the autograd
# engine (DDP's gradient all-reduce) as well as from torch.distributed's own calls.
GLOO_PEER_FAILURES = ("Connection closed by peer", "Connection reset by peer", "Timed out waiting")


def is_peer_failure(error: BaseException, world: World) -> bool:
    """Whether `error` is a collective that failed because another process of the job did."""
    if not world.distributed or not isinstance(error, RuntimeError):
        return False
    message = str(error)
    return isinstance(error, dist.DistError) or any(m in message for m in GLOO_PEER_FAILURES)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


# ---- full state for checkpoints -------------------------------------------------------------


def _optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    # A composite (e.g. Muon + its AdamW companion) exposes its parts as `optimizers`.
    return list(getattr(optimizer, "optimizers", (optimizer,)))


def full_state(
    model: nn.Module, optimizer: Any, trainable_only: bool = False
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(weights, optimizer state) unsharded, on the CPU, keyed by parameter name. Every rank must
    call this (it gathers shards); in a distributed run only rank 0 gets non-empty dicts.
    `trainable_only` (LoRA adapters, never sharded) leaves the frozen weights out."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if trainable_only:
        weights = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    else:
        weights = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, _optimizers(optimizer), options=options)
    return weights, optimizer_state


def load_full_state(
    model: nn.Module,
    optimizer: Any,
    weights: dict[str, Any],
    optimizer_state: dict[str, Any],
    world: World,
    optimizer_only: bool = False,
) -> None:
    """The inverse of `full_state`: in a distributed run rank 0 passes what it read from disk,
    the other ranks empty dicts, and each rank keeps its own shard (or replica).
    `optimizer_only`: the weights were loaded already (LoRA adapters)."""
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world.distributed)
    if not optimizer_only:
        set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, _optimizers(optimizer), optimizer_state, options=options)
