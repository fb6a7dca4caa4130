"""Generation throughput with the KV cache: neoxlab's `generate` vs transformers' `generate` on
the same model exported with `neoxlab export`.

For each model shape, neoxlab trains one step on random tokens (so there is a real checkpoint;
speed depends on shapes only, and no corpus has to be at hand), exports it with
neoxlab.hf.export_hf, and loads the export with transformers' GPTNeoXForCausalLM. Both then
decode greedily from the same random prompts (--prompt tokens) for --new-tokens tokens (fewer
where the context ends sooner) at batch 1 and 16, in bf16 on a GPU (fp32 on a CPU), never
stopping early. Tokens/s counts new tokens
of all rows; the best of --repeats timed runs after one warm-up run. "same tokens" is the share
of positions where both chose the same token (1.0 in fp32; bf16 rounding may flip near-ties).

    python bench/generate.py [--models baby pythia160m] [--batches 1 16] [--record]
"""

from __future__ import annotations

import contextlib
import functools
import io
import time

import common
import corpora
import torch

from neoxlab.checkpoint import latest_checkpoint
from neoxlab.hf import export_hf, load_trained
from neoxlab.trainer import Trainer

MODELS = {
    # name -> (config file, vocabulary of the random corpus: the config's own tokenizer's size)
    "baby": (common.CONFIGS / "shakespeare_char.yml", 67),  # Tiny Shakespeare's 65 characters + 2
    "pythia160m": (common.CONFIGS / "pythia" / "160M.yml", 50277),
}
HEADERS = [
    "model",
    "batch",
    "implementation",
    "tokens/s",
    "ms/token",
    "vs transformers",
    "same tokens",
]


def checkpoint_for(name: str, folder, smoke: bool):
    config_file, vocab = MODELS[name]
    (folder / name).mkdir()
    overrides = [
        *corpora.synthetic_corpus(folder / name, min(vocab, 500) if smoke else vocab, 100_000),
        "train-iters=1",
        "micro-batch-size=1",
        "global-batch-size=1",
        "checkpoint-activations=false",
        "eval-iters=1",
        "sample-tokens=0",
        "compile=false",
        "save-interval=1",
        *(common.SMOKE_MODEL if smoke else []),
    ]
    trainer = Trainer(
        common.neoxlab_config([config_file], overrides), progress=False, log=common.quiet
    )
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.run()
    return latest_checkpoint(trainer.run_dir / "checkpoints")


def neoxlab_generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return torch.stack(list(model.generate(prompt, new_tokens, temperature=0.0)), dim=1)


@torch.no_grad()
def transformers_generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=model.config.pad_token_id,
    )
    return out[:, prompt.size(1) :]


def timed(function, repeats: int, device) -> tuple[float, torch.Tensor]:
    function()  # warm-up: CUDA context, kernels, allocator
    best, output = float("inf"), None
    for _ in range(repeats):
        common.synchronize(device)
        start = time.perf_counter()
        output = function()
        common.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best, output


def model_rows(
    name: str,
    folder,
    device: torch.device,
    batches: list[int],
    prompt_tokens: int,
    new_tokens: int,
    repeats: int,
    smoke: bool,
) -> list[list[object]]:
    """The table's rows for one model: both implementations at each batch size."""
    import transformers

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    checkpoint = checkpoint_for(name, folder, smoke)
    export = export_hf(checkpoint, folder / f"{name}-hf", log=common.quiet)
    ours = load_trained(checkpoint, device).model.to(dtype).eval()
    theirs = transformers.GPTNeoXForCausalLM.from_pretrained(export).to(device, dtype).eval()
    theirs.generation_config.eos_token_id = None  # never stop early, as neoxlab here
    vocab = ours.config.vocab_size
    # within the context: past it neoxlab slides its window, transformers does not
    new_tokens = min(new_tokens, ours.config.max_position_embeddings - prompt_tokens)
    rows: list[list[object]] = []
    for batch in batches:
        generator = torch.Generator().manual_seed(batch)
        prompt = torch.randint(0, min(vocab, 60), (batch, prompt_tokens), generator=generator)
        prompt = prompt.to(device)
        ours_run = functools.partial(neoxlab_generate, ours, prompt, new_tokens)
        theirs_run = functools.partial(transformers_generate, theirs, prompt, new_tokens)
        seconds, our_tokens = timed(ours_run, repeats, device)
        hf_seconds, hf_tokens = timed(theirs_run, repeats, device)
        same = (our_tokens == hf_tokens).float().mean().item()
        new = batch * new_tokens
        for label, took in (("neoxlab", seconds), ("transformers", hf_seconds)):
            rows.append(
                [
                    name,
                    batch,
                    label,
                    common.number(new / took),
                    common.number(1e3 * took / new_tokens, "{:.2f}"),
                    f"{hf_seconds / took:.2f}x",
                    f"{same:.3f}",
                ]
            )
    return rows


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.smoke:
        args.prompt, args.new_tokens, args.repeats, args.batches = 8, 8, 1, [1, 2]
    device = common.bench_device(args.smoke)
    rows: list[list[object]] = []
    with common.scratch() as folder:
        for name in args.models:
            rows += model_rows(
                name,
                folder,
                device,
                args.batches,
                args.prompt,
                args.new_tokens,
                args.repeats,
                args.smoke,
            )
    dtype = "bf16" if device.type == "cuda" else "fp32"
    print(f"KV-cache generation on {common.describe_device(device)} ({dtype})")
    common.report(
        args.record, "Generation with the KV cache", HEADERS, rows, device, __file__, argv
    )
    return rows


if __name__ == "__main__":
    main()
