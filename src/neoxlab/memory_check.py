"""Does a run fit this machine? memory.py's estimate against the memory free here.

A run compares the estimate with the device's memory before any data work (GPU: the free
memory torch.cuda.mem_get_info reports, and host memory for what offload keeps there; CPU: the
memory Linux says is available), and stops with one line when it cannot fit, naming the options
that would: a smaller micro-batch, activation checkpointing, 8-bit AdamW, optimizer offload,
LoRA, QLoRA, more GPUs, each with its own estimate. An allocation that fails anyway (the
estimate leaves out fragmentation and what other processes take) becomes the same one line.
`neoxlab train --dry-run` prints the same verdict without training.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from neoxlab.config import Config
from neoxlab.distributed import World
from neoxlab.errors import NeoxlabError
from neoxlab.memory import GIB, TrainingPlan, describe
from neoxlab.runtime import Runtime, native_bf16, resolve_device

# What a CUDA process holds besides tensors (context, kernels, cuBLAS workspace): the estimate
# leaves it out, the free memory it is compared with must not.
CUDA_OVERHEAD_BYTES = GIB // 2
MEMINFO = Path("/proc/meminfo")
LORA_RANK = 8  # what the options suggest: the QLoRA paper's and PEFT's usual starting rank
GPU_COUNTS = (2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Machine:
    """Where the run trains and what memory it has free (None: unknown)."""

    device_type: str  # cpu | cuda | mps
    precision: str  # fp32 | fp16 | bf16
    device_free: int | None  # GPU memory free (cpu: = host_free)
    host_free: int | None
    name: str  # "NVIDIA T4" or "this machine"
    processes_per_host: int = 1  # torchrun's processes on this node share its host memory
    vocab_rows: int | None = None  # the embedding rows of init-from's model (else from config)


def host_available() -> int | None:
    """Bytes of memory the kernel could give a new process (Linux: MemAvailable, which
    counts reclaimable caches), else the free pages, else None."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def machine(device: torch.device, precision: str, vocab_rows: int | None = None) -> Machine:
    host = host_available()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
        return Machine("cuda", precision, free, host, name, local, vocab_rows)
    free = host if device.type == "cpu" else None
    return Machine(device.type, precision, free, host, "this machine", local, vocab_rows)


# ---- the verdict --------------------------------------------------------------------------------


def fits(plan: TrainingPlan, where: Machine) -> bool:
    """Whether the plan fits; unknown free memory counts as room."""
    host_need = plan.host_bytes * where.processes_per_host
    if where.device_type == "cpu":
        return where.host_free is None or plan.device_bytes + host_need <= where.host_free
    device_ok = where.device_free is None or (
        plan.device_bytes + CUDA_OVERHEAD_BYTES <= where.device_free
    )
    return device_ok and (where.host_free is None or host_need <= where.host_free)


def summary(plan: TrainingPlan, where: Machine) -> str:
    """`memory (estimate): ...` against what is free, on one line."""
    if where.device_type == "cpu":
        need = plan.device_bytes + plan.host_bytes
        return f"memory (estimate): {_gib(need)} of {_gib(where.host_free)} available"
    host = f"; host {_gib(plan.host_bytes)} of {_gib(where.host_free)} available"
    return (
        f"memory (estimate): GPU {_gib(plan.device_bytes)} of {_gib(where.device_free)} free "
        f"on {where.name}{host if plan.host_bytes else ''}"
    )


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GIB:.1f} GiB"


def _need(plan: TrainingPlan, where: Machine) -> str:
    if where.device_type == "cpu":
        return _gib(plan.device_bytes + plan.host_bytes)
    host = f" + host {_gib(plan.host_bytes)}" if plan.host_bytes else ""
    return f"{_gib(plan.device_bytes)}{host}"


def plan_for(config: Config, where: Machine, world_size: int = 1) -> TrainingPlan:
    return describe(config, world_size, where.precision, where.device_type, where.vocab_rows)


def options(config: Config, where: Machine) -> list[tuple[str, TrainingPlan]]:
    """Changes that lower the memory a run needs, as the overrides that make them, each with
    its plan; only those that apply to this config and machine."""
    found: list[tuple[str, Config]] = []
    micro, accumulation, _ = config.batch_geometry(1)
    if micro > 1:
        # the same batch per step, from more micro-batches
        gas = None if config.train_batch_size else micro * accumulation
        keep = f" gradient-accumulation-steps={gas}" if gas else ""
        smaller = _replace(
            config, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=gas
        )
        found.append((f"micro-batch-size=1{keep}", smaller))
    if not config.checkpoint_activations:
        found.append(("checkpoint-activations=true", _replace(config, checkpoint_activations=True)))
    full = not config.lora_rank
    gpu = where.device_type == "cuda"
    # AdamW8bit cannot step offloaded (FSDP) weights; LoRA is never offloaded
    offload = config.offload_optimizer()
    unloaded = {k: v for k, v in config.zero_optimization.items() if k == "stage"}
    if full and not offload and config.optimizer["type"] in ("Adam", "AdamW"):
        eight_bit = {**config.optimizer, "type": "AdamW8bit"}
        found.append(("optimizer.type=AdamW8bit", _replace(config, optimizer=eight_bit)))
    if full and gpu and not offload:
        zero = {**config.zero_optimization, "offload_optimizer": {"device": "cpu"}}
        found.append(
            (
                "zero-optimization.offload-optimizer.device=cpu",
                _replace(config, zero_optimization=zero),
            )
        )
    if full and config.init_from:
        lora = _replace(
            config, lora_rank=LORA_RANK, checkpoint_activations=True, zero_optimization=unloaded
        )
        found.append((f"lora-rank={LORA_RANK} checkpoint-activations=true", lora))
    if gpu and config.init_from and not config.load_in_4bit:
        qlora = _replace(
            config,
            lora_rank=config.lora_rank or LORA_RANK,
            load_in_4bit=True,
            checkpoint_activations=True,
            zero_optimization=unloaded,
        )
        found.append(
            (f"lora-rank={qlora.lora_rank} load-in-4bit=true checkpoint-activations=true", qlora)
        )
    return [(label, plan_for(changed, where)) for label, changed in found]


def _replace(config: Config, **changes: object) -> Config:
    changed = dataclasses.replace(config, **changes)
    changed.validate()
    return changed


def more_gpus(config: Config, where: Machine) -> tuple[int, TrainingPlan] | None:
    """The fewest GPUs that FSDP needs to fit (each as free as this one; on a CPU machine,
    80 GiB GPUs), with its plan; None when sharding does not apply (LoRA, AdamW8bit) or 64 do
    not fit."""
    if config.lora_rank or config.optimizer["type"] == "AdamW8bit":
        return None
    # memory per GPU does not depend on the batch per step (which may not divide by N)
    fsdp = _replace(
        config, distributed="fsdp", train_batch_size=None, gradient_accumulation_steps=None
    )
    gpu = (
        where
        if where.device_type == "cuda"
        else dataclasses.replace(where, device_type="cuda", device_free=80 * GIB, precision="bf16")
    )
    for count in GPU_COUNTS if where.device_type == "cuda" else (1, *GPU_COUNTS):
        plan = describe(fsdp, count, gpu.precision, "cuda", where.vocab_rows)
        if fits(plan, gpu):
            return count, plan
    return None


def advice(config: Config, where: Machine) -> str:
    """Which options would fit and which would not, with their estimates, on one line."""
    fitting, too_large = [], []
    for label, plan in options(config, where):
        (fitting if fits(plan, where) else too_large).append(f"{label} ({_need(plan, where)})")
    gpus = more_gpus(config, where)
    if gpus is not None:
        count, plan = gpus
        if where.device_type != "cuda" and count == 1:
            fitting.append(f"a GPU of 80 GiB ({_gib(plan.device_bytes)})")
        else:
            size = "like this one" if where.device_type == "cuda" else "of 80 GiB"
            fitting.append(
                f"{count} GPUs {size} with FSDP (torchrun --nproc_per_node={count} ... "
                f"distributed=fsdp; {_gib(plan.device_bytes)} each)"
            )
    parts = []
    if fitting:
        parts.append("these would fit: " + "; ".join(fitting))
    if too_large:
        parts.append(
            ("still too large: " if fitting else "none of these fits: ") + "; ".join(too_large)
        )
    return " | ".join(parts) or "lower seq-length or the model's size"


def check_memory(
    config: Config,
    runtime: Runtime,
    world: World,
    sharded: bool,
    log: Callable[[str], None] = print,
    vocab_rows: int | None = None,
) -> TrainingPlan:
    """The plan of this run, said in one line; a NeoxlabError saying what would fit when it
    does not fit the free memory. `vocab_rows`: init-from's embedding rows."""
    where = machine(runtime.device, runtime.precision, vocab_rows)
    plan = plan_for(config, where, world.world_size if sharded else 1)
    log(summary(plan, where))
    if not fits(plan, where):
        raise NeoxlabError(_too_large(plan, where), hint=advice(config, where))
    return plan


def _too_large(plan: TrainingPlan, where: Machine) -> str:
    """What does not fit, GPU or host memory, in words."""
    host_need = plan.host_bytes * where.processes_per_host
    if where.device_type == "cpu":
        return (
            f"this run needs about {_gib(plan.device_bytes + host_need)} of memory (estimate) "
            f"but {where.name} has {_gib(where.host_free)} available"
        )
    short = []
    if (
        where.device_free is not None
        and plan.device_bytes + CUDA_OVERHEAD_BYTES > where.device_free
    ):
        short.append(
            f"{_gib(plan.device_bytes)} of GPU memory (estimate, and ~0.5 GiB for CUDA itself) "
            f"but {where.name} has {_gib(where.device_free)} free"
        )
    if where.host_free is not None and host_need > where.host_free:
        short.append(
            f"{_gib(host_need)} of host memory for what it offloads but "
            f"{_gib(where.host_free)} is available"
        )
    return "this run needs about " + " and ".join(short)


def memory_error(err: RuntimeError, config: Config) -> NeoxlabError | None:
    """An allocation failure as one line with what would fit; None for other errors."""
    out_of_memory = isinstance(err, torch.OutOfMemoryError) or "DefaultCPUAllocator" in str(err)
    if not out_of_memory:
        return None
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    device = resolve_device(config.device)
    where = machine(device, "fp32" if device.type == "cpu" else config.requested_precision())
    return NeoxlabError(
        f"out of memory on {where.name} ({first_line[:200]})", hint=advice(config, where)
    )


def dry_run_lines(config: Config, vocab_rows: int | None = None) -> list[str]:
    """What `--dry-run` prints: the plan for the config as given, then whether it fits here
    (with the precision this machine would train in) and, when it does not, what would.
    `vocab_rows`: init-from's embedding rows."""
    lines = describe(config, vocab_rows=vocab_rows).lines()
    try:
        device = resolve_device(config.device)
    except NeoxlabError as err:  # device=cuda on a machine without one
        return [*lines, f"on this machine: {err.message}"]
    precision = config.requested_precision()
    if device.type != "cuda" or precision == "auto":
        precision = "fp32" if device.type != "cuda" else ("bf16" if native_bf16(device) else "fp16")
    where = machine(device, precision, vocab_rows)
    plan = plan_for(config, where)
    verdict = summary(plan, where) + (": fits" if fits(plan, where) else ": does not fit")
    lines.append(f"on this machine ({device.type}, {precision}): {verdict}")
    if not fits(plan, where):
        lines.append(f"  {advice(config, where)}")
    return lines
