"""Hardware decisions: device, precision, torch.compile, the attention kernels SDPA can use,
fp32 matmul precision (TF32 on GPUs, bf16 arithmetic on CPUs that have it), and peak FLOP/s
for MFU.

What `auto` means on a CUDA GPU is a pure function of its compute capability (`choose_precision`,
`auto_compile`, `attention_kernels`), so the choices for a T4 (7.5), an A100 (8.0) or an H100
(9.0) run, and are tested, on any machine."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend

from neoxlab.errors import NeoxlabError

# Dense bf16/fp16 tensor-core peaks, FLOP/s (DESIGN.md "Known traps").
PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("T4", 65e12))

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# torch.compile modes that capture CUDA graphs
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")

# Ampere (8.0) and later: native bf16, SDPA's flash kernel, and Triton's supported targets (so
# torch.compile's GPU backend). A T4 (7.5) has none of them.
AMPERE = (8, 0)

# What `compile: auto` means on a CPU: the one place to change it. Off until measured:
# inductor's C++ kernels must win back their compile time on the README quickstart
# (configs/shakespeare.yml train-iters=300) on an idle machine; bench/RESULTS.md ("CPU: does
# compiling the training step pay?") has the commands.
COMPILE_ON_CPU_BY_DEFAULT = False

# SDPA's kernels by the names the run's first line uses.
ATTENTION_NAMES = {
    SDPBackend.FLASH_ATTENTION: "flash",
    SDPBackend.EFFICIENT_ATTENTION: "memory-efficient",
    SDPBackend.CUDNN_ATTENTION: "cuDNN",
    SDPBackend.MATH: "math",
}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32 | fp16 | bf16
    compile: bool
    compile_mode: str = "default"  # torch.compile's mode, when compile is on
    capability: tuple[int, int] | None = None  # the CUDA GPU's compute capability

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @property
    def cuda_graphs(self) -> bool:
        """Whether the compiled model replays CUDA graphs (each step must then be marked)."""
        return self.compile and self.device.type == "cuda" and self.compile_mode in CUDA_GRAPH_MODES

    @property
    def attention_kernels(self) -> tuple[SDPBackend, ...]:
        return attention_kernels(self.device.type, self.capability, self.precision)

    def describe(self) -> str:
        """For the run's first line: "cuda bf16 compiled, flash attention", "cpu fp32"."""
        text = f"{self.device.type} {self.precision}"
        if self.compile:
            text += (
                " compiled"
                if self.compile_mode == "default"
                else f" compiled ({self.compile_mode})"
            )
        if self.device.type == "cuda":
            text += f", {ATTENTION_NAMES[self.attention_kernels[0]]} attention"
        return text

    def compiled(self, model: torch.nn.Module) -> torch.nn.Module:
        """`model` through torch.compile in the chosen mode, or itself when compile is off."""
        return torch.compile(model, mode=self.compile_mode) if self.compile else model

    def peak_flops(self) -> float | None:
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        return next((peak for key, peak in PEAK_FLOPS if key in name), None)


def model_flops_utilization(
    flops_per_token: float, tokens_per_second: float, peak_per_device: float, devices: int
) -> float:
    """MFU: the model FLOP/s achieved by all `devices` together over their summed peak."""
    return flops_per_token * tokens_per_second / (peak_per_device * devices)


def enable_tf32() -> None:
    """Let fp32 matmuls use TF32 tensor cores (Ampere and later), which round their inputs to
    10 mantissa bits (fp16's): what fp32 runs and the fp32 matmuls left under autocast gain.
    The legacy setter on purpose: it keeps torch's old and new TF32 flags consistent, and
    torch._inductor still reads the old one (mixing them makes that read raise)."""
    torch.set_float32_matmul_precision("high")


def enable_fast_cpu_matmuls() -> None:
    """Let fp32 matmuls on the CPU use oneDNN's bf16 arithmetic where the CPU has it (AVX512-BF16,
    AMX); elsewhere torch falls back to plain fp32, so it is safe to ask everywhere. Measured on
    a 2-core AMD EPYC (Zen 4): 2.2x the fp32 matmul throughput, with a largest error within 3x
    of IEEE fp32's (4.9e-5 against 3.4e-5 for a 256-long product of unit normals; bf16 inputs
    err by 0.3), and 1.55x the quickstart's training steps (bench/RESULTS.md). The CPU's
    counterpart of TF32: the model, its activations, gradients and optimizer stay fp32."""
    torch.set_float32_matmul_precision("medium")


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise NeoxlabError(
            "device cuda was requested but no CUDA GPU is available",
            hint="use device=auto or device=cpu",
        )
    if requested == "mps" and not torch.backends.mps.is_available():
        raise NeoxlabError(
            "device mps was requested but MPS is not available",
            hint="use device=auto or device=cpu",
        )
    return torch.device(requested)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively: a CUDA GPU of compute capability >= 8.0 (not
    torch.cuda.is_bf16_supported(), which counts emulation and says True on a T4)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= AMPERE


def choose_precision(
    device_type: str, capability: tuple[int, int] | None, requested: str, notice=print
) -> str:
    """The precision to train in for the config's request (auto | fp32 | fp16 | bf16):
    on a CUDA GPU bf16 where native (`capability` >= 8.0), else fp16 with the GradScaler;
    elsewhere fp32."""
    if device_type != "cuda":
        if requested in ("fp16", "bf16"):
            notice(f"note: {requested} requested but running on {device_type}: training in fp32")
        return "fp32"
    bf16 = capability is not None and capability >= AMPERE  # see native_bf16
    if requested == "auto":
        return "bf16" if bf16 else "fp16"
    if requested == "bf16" and not bf16:
        raise NeoxlabError(
            "bf16 was requested but this GPU has no native bf16",
            hint="use fp16 (the GradScaler handles overflow) or precision=auto",
        )
    return requested


def auto_compile(device_type: str, capability: tuple[int, int] | None) -> bool:
    """What `compile: auto` means: on CUDA GPUs Triton supports (sm >= 8.0; a T4 or a V100
    runs eagerly), on a CPU COMPILE_ON_CPU_BY_DEFAULT, elsewhere (MPS) off."""
    if device_type == "cuda":
        return capability is not None and capability >= AMPERE
    return device_type == "cpu" and COMPILE_ON_CPU_BY_DEFAULT


def attention_kernels(
    device_type: str, capability: tuple[int, int] | None, precision: str
) -> tuple[SDPBackend, ...]:
    """SDPA's kernels able to run neoxlab's causal attention (no mask) in `precision`, in the
    order torch tries them: the first is the one that runs. On a CUDA GPU flash needs
    sm >= 8.0 and fp16/bf16, the memory-efficient kernel takes bf16 from sm 8.0 on (fp16 and
    fp32 anywhere), math takes anything; cuDNN's comes after math in torch's order and never
    runs unless asked for. A CPU has its own flash kernel (any float type). Elsewhere (MPS):
    () - torch's choice, not listed here. bench/gpu_check.py checks on a GPU that the first
    is what SDPA picks."""
    if device_type == "cpu":
        return (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)
    if device_type != "cuda" or capability is None:
        return ()
    ampere = capability >= AMPERE
    kernels = []
    if ampere and precision in ("fp16", "bf16"):
        kernels.append(SDPBackend.FLASH_ATTENTION)
    if ampere or precision != "bf16":
        kernels.append(SDPBackend.EFFICIENT_ATTENTION)
    return (*kernels, SDPBackend.MATH)


def resolve_runtime(
    device: str, precision: str, compile_setting: str, notice=print, compile_mode: str = "default"
) -> Runtime:
    """`precision` is the config's request (auto | fp32 | fp16 | bf16), `compile_setting` its
    `compile` (auto | true | false). For the process, this also turns TF32 on for a CUDA device
    and bf16 matmul arithmetic for a CPU."""
    dev = resolve_device(device)
    capability = torch.cuda.get_device_capability(dev) if dev.type == "cuda" else None
    if dev.type == "cuda":
        enable_tf32()
    elif dev.type == "cpu":
        enable_fast_cpu_matmuls()
    chosen = choose_precision(dev.type, capability, precision, notice)
    if compile_setting == "auto":
        use_compile = auto_compile(dev.type, capability)
    else:
        use_compile = compile_setting == "true"
    return Runtime(dev, chosen, use_compile, compile_mode, capability)
