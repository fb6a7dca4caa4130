"""GPU memory of finetuning Pythia-1.4B on one GPU, each option against its estimate.

A Pythia-1.4B-shaped GPTNeoXForCausalLM folder with random weights (memory depends on shapes
only) and a BPE tokenizer trained on data/chat_example.txt stand in for the download. Each
option finetunes it through neoxlab's trainer on chat examples padded to 280 tokens, micro-batch
4, for 20 steps, eagerly (compile=false, as on a T4), and reports torch.cuda.max_memory_allocated
(and reserved) against the estimate the run itself printed (memory.py): full AdamW in bf16 (the
baseline), LoRA r=8 and QLoRA in fp16 (a T4's precision) with activation checkpointing, 8-bit
AdamW in bf16, and optimizer offload (FSDP2's CPU offload) in bf16 with its host memory. The
issue's targets: LoRA <= 10 GiB, QLoRA <= 6 GiB, 8-bit AdamW full finetune <= 20 GiB.

A run whose estimate does not fit the GPU is refused by the trainer before it starts, and the
row says so. `--smoke` runs a tiny shape on the CPU (QLoRA there is the one-line refusal).

    python bench/finetune_memory.py [--steps 20] [--options full lora qlora adamw8bit offload]
        [--record]
"""

from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import common
import throughput
import torch

from neoxlab import distributed
from neoxlab.errors import NeoxlabError
from neoxlab.memory import GIB
from neoxlab.tokenizer import save_tokenizer, train_bpe
from neoxlab.trainer import Trainer

CHAT_EXAMPLE = common.REPO / "data" / "chat_example.txt"
CONFIG = common.CONFIGS / "chat_finetune_lora.yml"
# Pythia-1.4B's shape (EleutherAI/pythia-1.4b-deduped config.json); smoke: a tiny one
PYTHIA_1_4B = {"hidden_size": 2048, "num_hidden_layers": 24, "num_attention_heads": 16}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
OPTIONS = {
    "full": (["lora-rank=0", "precision=bf16"], None),
    "lora": (["precision=fp16"], 10),
    "qlora": (["precision=fp16", "load-in-4bit=true"], 6),
    "adamw8bit": (["lora-rank=0", "precision=bf16", "optimizer.type=AdamW8bit"], 20),
    "offload": (
        ["lora-rank=0", "precision=bf16", "zero-optimization.offload-optimizer.device=cpu"],
        None,
    ),
}
HEADERS = [
    "option",
    "precision",
    "estimate GPU GiB",
    "peak allocated GiB",
    "peak reserved GiB",
    "allocated / estimate",
    "estimate host GiB",
    "target GiB",
    "met",
]


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per option")
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), choices=OPTIONS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps = 2
    device = common.bench_device(args.smoke)
    rows = []
    with common.scratch() as folder:
        base = pythia_folder(folder / "pythia", TINY if args.smoke else PYTHIA_1_4B)
        shutil.copyfile(CHAT_EXAMPLE, folder / CHAT_EXAMPLE.name)
        for name in args.options:
            overrides, target = OPTIONS[name]
            shape = [
                f"init-from={base}",
                f"data-path={folder / CHAT_EXAMPLE.name}",
                *(["seq-length=32"] if args.smoke else ["seq-length=280"]),
                "micro-batch-size=4",
                "global-batch-size=4",
                "compile=false",
                "checkpoint-activations=true",
                f"device={device.type}",
            ]
            run = [*shape, *overrides, *throughput.timed_run_overrides(args.steps, 5, False)]
            config = common.neoxlab_config([CONFIG], run)
            rows.append([name, *measure(config, device, target)])
    print(f"Pythia-1.4B finetuning memory, 280 tokens x 4, on {common.describe_device(device)}")
    common.report(
        args.record,
        "Finetuning Pythia-1.4B on one GPU: peak memory vs estimate",
        HEADERS,
        rows,
        device,
        __file__,
        argv,
    )
    return rows


def pythia_folder(folder: Path, shape: dict[str, int]) -> Path:
    """A GPTNeoXForCausalLM folder of `shape` (Pythia's other settings), random weights in fp16
    (half the disk of fp32; neoxlab loads them into fp32), with a BPE tokenizer."""
    import transformers

    config = transformers.GPTNeoXConfig(
        vocab_size=50304,
        intermediate_size=4 * shape["hidden_size"],
        max_position_embeddings=2048,
        rotary_pct=0.25,
        hidden_act="gelu",
        use_parallel_residual=True,
        tie_word_embeddings=False,
        **shape,
    )
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config).half()
    model.save_pretrained(folder)
    save_tokenizer(train_bpe([CHAT_EXAMPLE.read_text(encoding="utf-8")], 1000), folder)
    return folder


def measure(config, device: torch.device, target: int | None) -> list[object]:
    """Train `config`; the row after the option's name (the refusal when it does not fit)."""
    throughput.reset_peak_memory(device)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = Trainer(config, progress=False, log=common.quiet)
            trainer.run()
    except NeoxlabError as err:
        return [config.requested_precision(), "-", "-", "-", "-", "-", target or "-", err.message]
    finally:
        distributed.shutdown()  # offload's process group of one
    plan, precision = trainer.memory, trainer.runtime.precision
    del trainer
    throughput.release(device)
    estimate = plan.device_bytes / GIB
    allocated = throughput.peak_memory_gib(device)
    reserved = torch.cuda.max_memory_reserved(device) / GIB if device.type == "cuda" else None
    met = (
        "-"
        if allocated is None or target is None
        else ("met" if allocated <= target else "not met")
    )
    return [
        precision,
        f"{estimate:.2f}",
        common.number(allocated, "{:.2f}"),
        common.number(reserved, "{:.2f}"),
        "-" if allocated is None else f"{allocated / estimate:.2f}",
        f"{plan.host_bytes / GIB:.2f}",
        target or "-",
        met,
    ]


if __name__ == "__main__":
    main()
