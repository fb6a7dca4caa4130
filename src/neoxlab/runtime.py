"""Hardware decisions: device, precision, torch.compile, fp32 matmul precision (TF32 on GPUs,
bf16 arithmetic on CPUs that have it), and peak FLOP/s for MFU."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from neoxlab.errors import NeoxlabError

# Dense bf16/fp16 tensor-core peaks, FLOP/s (DESIGN.md "Known traps").
PEAK_FLOPS = (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("T4", 65e12))

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# torch.compile modes that capture CUDA graphs
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    precision: str  # fp32 | fp16 | bf16
    compile: bool
    compile_mode: str = "default"  # torch.compile's mode, when compile is on

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
    # is_bf16_supported() counts emulation and says True on a T4: ask for native support only.
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_runtime(
    device: str, precision: str, compile_setting: str, notice=print, compile_mode: str = "default"
) -> Runtime:
    """`precision` is the config's request (auto | fp32 | fp16 | bf16). For the process, this
    also turns TF32 on for a CUDA device and bf16 matmul arithmetic for a CPU."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        enable_tf32()
    elif dev.type == "cpu":
        enable_fast_cpu_matmuls()
    if dev.type != "cuda":
        if precision in ("fp16", "bf16"):
            notice(f"note: {precision} requested but running on {dev.type}: training in fp32")
        chosen = "fp32"
    elif precision == "auto":
        chosen = "bf16" if native_bf16(dev) else "fp16"
    elif precision == "bf16" and not native_bf16(dev):
        raise NeoxlabError(
            "bf16 was requested but this GPU has no native bf16",
            hint="use fp16 (the GradScaler handles overflow) or precision=auto",
        )
    else:
        chosen = precision
    if compile_setting == "auto":
        # Triton targets sm >= 8.0; older GPUs (T4, V100) and CPUs run eagerly by default.
        use_compile = dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 8
    else:
        use_compile = compile_setting == "true"
    return Runtime(dev, chosen, use_compile, compile_mode)
