"""neoxlab's model.py at another commit against the working tree's, interleaved in one process.

Whether a change to model.py costs training speed at Pythia's shapes. Timings from two separate
runs on a shared machine compare the machine's load as much as the code; here both models train
side by side in one process, alternating, on the same batches, from the same weights: the
earlier commit's model.py is read with `git show` and imported as a module of its own. A step
is what neoxlab's CPU trainer does with the model: micro-batches through forward and backward
(the chunked loss, as on a CPU), gradient clipping at 1.0 and a fused AdamW step, in fp32 with
the matmul precision neoxlab's CPU runtime sets. The shapes are bench/cpu_ratio.py's: the README
quickstart (configs/shakespeare.yml) and Pythia-14M (configs/pythia/14M.yml) at 2 x 2,048
tokens. The table gives the median tokens/s over rounds, the spread (min-max), and the median
of the per-round ratios (after / before; above 1 is faster).

    python bench/model_before_after.py --before e23cf8f [--rounds 7] [--steps 3] [--record]
"""

from __future__ import annotations

import dataclasses
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import common
import cpu_ratio
import torch

from neoxlab import model as current_model
from neoxlab.config import model_config, padded_vocab_size
from neoxlab.runtime import enable_fast_cpu_matmuls

HEADERS = [
    "shape",
    "tokens/step",
    "threads",
    "before",
    "before tokens/s (spread)",
    "after tokens/s (spread)",
    "after / before",
]


def model_at(commit: str, folder: Path) -> ModuleType:
    """src/neoxlab/model.py as it was at `commit`, imported as a module of its own."""
    source = subprocess.run(
        ["git", "-C", str(common.REPO), "show", f"{commit}:src/neoxlab/model.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = folder / "model_before.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("model_before", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look the module up there
    spec.loader.exec_module(module)
    return module


def training_step(
    model: torch.nn.Module, batches: torch.Tensor, accumulation: int
) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)

    def step() -> None:
        for batch in batches:
            _, loss = model(batch[:, :-1], batch[:, 1:])
            (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(shape: str, before: ModuleType, commit: str, rounds: int, steps: int, smoke: bool):
    config_file, vocab, batch = cpu_ratio.SHAPES[shape]
    config = common.neoxlab_config(
        [config_file], [*batch, "device=cpu", *(common.SMOKE_MODEL if smoke else [])]
    )
    rows = padded_vocab_size(300 if smoke else vocab, config.make_vocab_size_divisible_by)
    after_config = model_config(config, rows, train_device_type="cpu")
    fields = {f.name for f in dataclasses.fields(before.ModelConfig)}
    before_config = before.ModelConfig(
        **{k: v for k, v in dataclasses.asdict(after_config).items() if k in fields}
    )
    models = {
        "before": before.GPTNeoX(before_config).train(),
        "after": current_model.GPTNeoX(after_config).train(),
    }
    models["before"].load_state_dict(models["after"].state_dict())  # the same weights
    micro, accumulation, global_batch = config.batch_geometry()
    generator = torch.Generator().manual_seed(0)
    batches = torch.randint(
        0, rows, (accumulation, micro, config.seq_length + 1), generator=generator
    )
    enable_fast_cpu_matmuls()
    steps_of = {name: training_step(m, batches, accumulation) for name, m in models.items()}
    for step in steps_of.values():
        step()  # warm-up: allocator, oneDNN primitives
    timings: dict[str, list[float]] = {name: [] for name in steps_of}
    for round_index in range(rounds):
        order = list(steps_of.items())
        for name, step in order if round_index % 2 == 0 else reversed(order):
            start = time.perf_counter()
            for _ in range(steps):
                step()
            timings[name].append((time.perf_counter() - start) / steps)
    tokens = global_batch * config.seq_length

    def rate(name: str) -> str:
        rates = [tokens / seconds for seconds in timings[name]]
        spread = f"{common.number(min(rates))}-{common.number(max(rates))}"
        return f"{common.number(statistics.median(rates))} ({spread})"

    ratios = [b / a for b, a in zip(timings["before"], timings["after"], strict=True)]
    return [
        shape,
        f"{global_batch} x {config.seq_length}",
        torch.get_num_threads(),
        commit,
        rate("before"),
        rate("after"),
        f"{statistics.median(ratios):.3f}x ({min(ratios):.3f}-{max(ratios):.3f})",
    ]


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--before", default="HEAD", help="commit whose model.py to compare with")
    parser.add_argument(
        "--shapes", nargs="+", default=list(cpu_ratio.SHAPES), choices=cpu_ratio.SHAPES
    )
    parser.add_argument("--rounds", type=int, default=7, help="A/B rounds (at least 5)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per turn")
    args = parser.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps = 2, 1
    precision = torch.get_float32_matmul_precision()
    with tempfile.TemporaryDirectory(prefix="neoxlab-bench-") as folder:
        before = model_at(args.before, Path(folder))
        rows = [
            measure(shape, before, args.before, args.rounds, args.steps, args.smoke)
            for shape in args.shapes
        ]
    torch.set_float32_matmul_precision(precision)
    device = torch.device("cpu")
    print(f"model.py training step on {common.describe_device(device)}, {args.rounds} rounds")
    common.report(
        args.record,
        "CPU: model.py before and after a change",
        HEADERS,
        rows,
        device,
        __file__,
        argv,
    )
    return rows


if __name__ == "__main__":
    main()
