"""`neoxlab prepare | train | eval | generate`: the command line.

User mistakes raise NeoxlabError anywhere below; `main` prints them as one line on stderr and
returns exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch

from neoxlab import __version__
from neoxlab.errors import NeoxlabError

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage mistakes as NeoxlabError (one line, exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise NeoxlabError(f"{self.prog}: {message}", hint=f"see `{self.prog} --help`")


def _key_reference() -> str:
    from neoxlab.config import key_reference

    lines = ["config keys (YAML files or key=value overrides; - and _ are the same):"]
    section = None
    for row_section, key, default, help_text in key_reference():
        if row_section != section:
            section = row_section
            lines.append(f"  [{section}]")
        lines.append(f"    {key} (default {default}): {help_text}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="neoxlab",
        description="Train GPT-NeoX-architecture language models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"neoxlab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    prepare = commands.add_parser("prepare", help="download and prepare a corpus")
    corpora = prepare.add_subparsers(dest="corpus", required=True, parser_class=_Parser)
    shakespeare = corpora.add_parser(
        "shakespeare",
        help="Tiny Shakespeare -> shakespeare.jsonl (first 90%% train, last 10%% validation)",
        description=(
            "Download Tiny Shakespeare (checked by sha256), or take a local copy, and write "
            "shakespeare.jsonl. Offline: pass --source FILE or set NEOXLAB_DATA_MIRROR to a "
            "folder holding tinyshakespeare/input.txt."
        ),
    )
    shakespeare.add_argument("--source", type=Path, help="local copy of input.txt (no download)")
    shakespeare.add_argument(
        "--out", type=Path, default=Path("data"), help="output folder (default: data/)"
    )
    shakespeare.set_defaults(handler=_cmd_prepare_shakespeare)

    train = commands.add_parser(
        "train",
        help="train a model from one or more config files",
        description=(
            "Train from CONFIG files merged left to right; KEY=VALUE arguments override any key "
            "(dotted for nested values, e.g. optimizer.params.betas=[0.9,0.95])."
        ),
        epilog=_key_reference(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("items", nargs="*", metavar="CONFIG|KEY=VALUE")
    train.add_argument("--resume", metavar="RUN", help="continue a run directory (or `latest`)")
    train.add_argument("--name", help="run name (default: adjective_scientist)")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(handler=_cmd_train)

    evaluate = commands.add_parser("eval", help="validation loss, perplexity and accuracy")
    evaluate.add_argument("path", type=Path, metavar="RUN_OR_CHECKPOINT")
    evaluate.add_argument("--eval-iters", type=int, help="batches to evaluate (default: config)")
    evaluate.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    evaluate.set_defaults(handler=_cmd_eval)

    generate = commands.add_parser("generate", help="generate text from a trained model")
    generate.add_argument("path", type=Path, metavar="RUN_OR_CHECKPOINT")
    generate.add_argument("--prompt", default="", help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=200)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--seed", type=int, default=None, help="seed for sampling")
    generate.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    generate.set_defaults(handler=_cmd_generate)
    return parser


def _split_train_items(items: Sequence[str]) -> tuple[list[str], list[str]]:
    files = [item for item in items if "=" not in item]
    overrides = [item for item in items if "=" in item]
    return files, overrides


def _cmd_prepare_shakespeare(args: argparse.Namespace) -> int:
    from neoxlab.data.corpora import fetch_shakespeare, write_shakespeare_jsonl
    from neoxlab.tokenizer import read_text

    source = fetch_shakespeare(args.source)
    args.out.mkdir(parents=True, exist_ok=True)
    out = write_shakespeare_jsonl(read_text(source), args.out / "shakespeare.jsonl")
    print(f"wrote {out} (from {source})")
    print("next: neoxlab train configs/shakespeare.yml")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from neoxlab.config import load_config
    from neoxlab.tracking import find_run
    from neoxlab.trainer import train

    files, overrides = _split_train_items(args.items)
    resume = find_run(args.resume) if args.resume else None
    if not files and not overrides and resume is None:
        raise NeoxlabError("no config file given", hint="neoxlab train configs/shakespeare.yml")
    if args.name:
        overrides.append(f"run-name={args.name}")
    if not files and resume is not None:
        files = [str(resume / "config.yml")]
    config = load_config(files, overrides)
    result = train(config, config_files=files, resume=resume, progress=not args.no_progress)
    best = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
    print(f"\nrun: {result.run_dir}")
    print(f"step {result.step} | best val loss {best}")
    if not result.finished:
        print(
            f"stopped early at step {result.step}; continue with: "
            f"neoxlab train {' '.join(args.items)} --resume {result.run_dir}"
        )
    print(f'try: neoxlab generate {result.run_dir} --prompt "ROMEO:" --max-new-tokens 200')
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from neoxlab.checkpoint import load_trained
    from neoxlab.data.batches import WindowSampler
    from neoxlab.data.prepare import prepare_data
    from neoxlab.evaluate import evaluate
    from neoxlab.runtime import resolve_runtime

    runtime = resolve_runtime(args.device, "auto", "false")
    trained = load_trained(args.path, runtime.device)
    config = trained.config
    data = prepare_data(config)
    if data.tokenizer.to_str() != trained.tokenizer.to_str():
        raise NeoxlabError(
            f"the data's tokenizer {data.tokenizer_file} differs from the checkpoint's",
            hint="evaluate with the data the model was trained on",
        )
    sampler = WindowSampler(data.splits["validation"], config.seq_length, config.seed, "validation")
    iters = args.eval_iters or config.eval_iters
    result = evaluate(trained.model, sampler, iters, config.train_micro_batch_size_per_gpu, runtime)
    print(f"checkpoint: {trained.checkpoint} (step {trained.state['step']})")
    print(
        f"validation loss {result['loss']:.4f} | perplexity {result['ppl']:.2f} | "
        f"next-token accuracy {result['acc']:.3f} ({iters} batches)"
    )
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from neoxlab.checkpoint import load_trained
    from neoxlab.runtime import resolve_runtime
    from neoxlab.tokenizer import encode, token_id

    if args.max_new_tokens < 0 or args.temperature < 0:
        raise NeoxlabError("--max-new-tokens and --temperature must not be negative")
    runtime = resolve_runtime(args.device, "auto", "false")
    trained = load_trained(args.path, runtime.device)
    tokenizer = trained.tokenizer
    eod_id = token_id(tokenizer, trained.config.eod_token)
    ids = encode(tokenizer, args.prompt) or [eod_id]
    generator = torch.Generator(device=runtime.device)
    if args.seed is not None:
        generator.manual_seed(args.seed)
    else:
        generator.seed()
    prompt = torch.tensor([ids], device=runtime.device)
    stream = trained.model.generate(
        prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=eod_id,
        generator=generator,
    )
    sys.stdout.write(args.prompt)
    new_ids: list[int] = []
    printed = ""
    for token in stream:
        new_ids.append(int(token[0]))
        # Decode the whole continuation each time: a byte-level token may end mid-character.
        text = tokenizer.decode(new_ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
    sys.stdout.write(tokenizer.decode(new_ids, skip_special_tokens=True)[len(printed) :] + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except NeoxlabError as err:
        message = f"error: {err.message}"
        if err.hint:
            message += f" (hint: {err.hint})"
        print(textwrap.shorten(message, 2000), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
