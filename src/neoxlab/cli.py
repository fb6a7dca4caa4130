"""`neoxlab prepare | train | eval | generate | export`: the command line.

User mistakes raise NeoxlabError anywhere below; `main` prints them as one line on stderr and
returns exit code 2, with no traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import signal
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from neoxlab import __version__
from neoxlab.errors import NeoxlabError

if TYPE_CHECKING:
    from neoxlab.checkpoint import TrainedModel
    from neoxlab.config import Config

EXIT_USER_ERROR = 2
DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS)


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
    _add_prepare(commands)
    _add_train(commands)
    _add_eval(commands)
    _add_generate(commands)
    _add_export(commands)
    _add_compare(commands)
    return parser


# Each `_add_*` adds one command's parser, its arguments and its handler. `commands` is what
# `add_subparsers` returns (argparse keeps that type private).


def _add_prepare(commands: Any) -> None:
    prepare = commands.add_parser("prepare", help="download and prepare a corpus")
    corpora = prepare.add_subparsers(dest="corpus", required=True, parser_class=_Parser)
    _add_prepare_shakespeare(corpora)
    _add_prepare_python_stdlib(corpora)
    _add_prepare_code(corpora)
    _add_prepare_jsonl(corpora)
    _add_prepare_chat(corpora)


def _add_out_folder(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--out", type=Path, default=Path("data"), help="output folder (default: data/)"
    )


def _add_split(command: argparse.ArgumentParser) -> None:
    command.add_argument("--split", default="900,100,0", help="train,validation,test weights")


def _add_no_progress(command: argparse.ArgumentParser) -> None:
    command.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_code_corpus_options(command: argparse.ArgumentParser) -> None:
    """What `prepare python-stdlib` and `prepare code` share: which files to keep, the split."""
    _add_out_folder(command)
    command.add_argument(
        "--include-tests", action="store_true", help="keep test files and test folders"
    )
    command.add_argument("--max-files", type=int, help="stop after N files (quick runs)")
    command.add_argument(
        "--max-file-bytes",
        type=int,
        default=1_000_000,
        help="drop larger files (default 1,000,000)",
    )
    _add_split(command)


def _add_prepare_shakespeare(corpora: Any) -> None:
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
    _add_out_folder(shakespeare)
    shakespeare.set_defaults(handler=_cmd_prepare_shakespeare)


def _add_prepare_python_stdlib(corpora: Any) -> None:
    stdlib = corpora.add_parser(
        "python-stdlib",
        help="this Python's standard library -> python_stdlib.jsonl (offline code corpus)",
        description=(
            "Write the running interpreter's standard library (PSF licence; site-packages "
            "skipped) as one jsonl record per .py file, split train/validation/test by a hash "
            "of the file's path, with a report of what was kept and dropped."
        ),
    )
    _add_code_corpus_options(stdlib)
    stdlib.set_defaults(handler=_cmd_prepare_python_stdlib)


def _add_prepare_code(corpora: Any) -> None:
    code = corpora.add_parser(
        "code",
        help="a folder of .py files, a jsonl or a Hugging Face dataset -> NAME_code.jsonl",
        description=(
            "Clean code and write one jsonl record per file (or record), split by a hash of the "
            "path (folders) or the text (records), with a report of what was kept and dropped."
        ),
    )
    code.add_argument("source", nargs="?", type=Path, metavar="DIR_OR_JSONL")
    code.add_argument("--field", default="text", help="the record field holding the code")
    code.add_argument(
        "--hf",
        metavar="DATASET",
        help="Hugging Face dataset: a Hub name, hf://...parquet or a local .parquet "
        '(needs pip install "neoxlab[data]")',
    )
    code.add_argument("--hf-config", help="the dataset's configuration (e.g. python)")
    code.add_argument("--hf-split", default="train", help="the dataset's split to read")
    _add_code_corpus_options(code)
    code.set_defaults(handler=_cmd_prepare_code)


def _add_prepare_jsonl(corpora: Any) -> None:
    jsonl = corpora.add_parser(
        "jsonl",
        help="jsonl (or .json lines) files, .gz/.zst too, or folders -> one GPT-NeoX .bin/.idx",
        description=(
            "Tokenize every record's text (streamed, in parallel) into "
            "PREFIX_{text-key}_document.bin/.idx, the files gpt-neox's preprocess_data.py writes."
        ),
    )
    jsonl.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders of them")
    jsonl.add_argument("--tokenizer", required=True, help="tokenizer.json (e.g. GPT-NeoX-20B's)")
    jsonl.add_argument("--out", required=True, metavar="PREFIX", help="output prefix")
    jsonl.add_argument("--text-key", default="text", help="the record key holding the text")
    jsonl.add_argument(
        "--no-append-eod",
        dest="append_eod",
        action="store_false",
        help="do not end each document with the end-of-document token",
    )
    jsonl.add_argument("--eod-token", default="<|endoftext|>", help="end-of-document token")
    jsonl.add_argument(
        "--workers", type=int, default=1, help="tokenizer processes (1: threads in this one)"
    )
    jsonl.add_argument(
        "--on-error",
        choices=("fail", "skip"),
        default="fail",
        help="a bad line (invalid JSON, missing key) fails the run or is reported and skipped",
    )
    _add_no_progress(jsonl)
    jsonl.set_defaults(handler=_cmd_prepare_jsonl)


def _add_prepare_chat(corpora: Any) -> None:
    chat = corpora.add_parser(
        "chat",
        help="tokenize User/Agent transcripts (.txt) or messages (.jsonl) for chat finetuning",
        description=(
            "Tokenize chat examples with the model's tokenizer, mask what is not learned, drop "
            "examples longer than --seq-length (and say how many), split train/validation and "
            "write <stem>.<hash>.chat/ (the folder `data-format: chat` training reads)."
        ),
    )
    chat.add_argument("source", type=Path, metavar="FILE")
    chat.add_argument(
        "--tokenizer",
        type=Path,
        required=True,
        help="the model's tokenizer: a Hugging Face folder, a neoxlab run, or a tokenizer.json",
    )
    chat.add_argument("--out", type=Path, help="folder to write into (default: beside FILE)")
    chat.add_argument("--seq-length", type=int, default=280, help="longest example kept (tokens)")
    chat.add_argument("--user-name", default="User", help="speaker name of the user turns")
    chat.add_argument("--agent-name", default="Agent", help="speaker name of the replies")
    chat.add_argument("--train-on-prompt", action="store_true", help="learn user turns too")
    _add_split(chat)
    chat.set_defaults(handler=_cmd_prepare_chat)


def _add_train(commands: Any) -> None:
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
    train.add_argument(
        "--resume",
        metavar="RUN",
        help="continue a run directory, `latest` (the newest run), or `auto` (the run with the "
        "newest complete checkpoint, named --name when given; a new run when there is none)",
    )
    train.add_argument("--name", help="run name (default: adjective_scientist)")
    _add_no_progress(train)
    train.add_argument("--wandb", action="store_true", help="log to W&B (same as use-wandb=true)")
    train.add_argument(
        "--dry-run",
        action="store_true",
        help="print parameters, estimated memory, tokens per step and steps; do not train",
    )
    train.set_defaults(handler=_cmd_train)


def _add_eval(commands: Any) -> None:
    evaluate = commands.add_parser(
        "eval", help="validation loss, perplexity and accuracy (and code metrics)"
    )
    evaluate.add_argument("path", type=Path, metavar="RUN_CHECKPOINT_OR_HF_FOLDER")
    evaluate.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config keys for this evaluation, e.g. data-path=FILE seq-length=512 "
        "(a Hugging Face folder has no data-path of its own)",
    )
    evaluate.add_argument("--eval-iters", type=int, help="batches to evaluate (default: config)")
    evaluate.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    _add_no_progress(evaluate)
    evaluate.set_defaults(handler=_cmd_eval)


def _add_generate(commands: Any) -> None:
    generate = commands.add_parser("generate", help="generate text from a trained model")
    generate.add_argument("path", type=Path, metavar="RUN_CHECKPOINT_OR_HF_FOLDER")
    generate.add_argument("--prompt", default="", help="text to continue")
    generate.add_argument("--max-new-tokens", type=int, default=200)
    generate.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    generate.add_argument("--top-k", type=int, default=None)
    generate.add_argument("--top-p", type=float, default=None)
    generate.add_argument("--seed", type=int, default=None, help="seed for sampling")
    generate.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    generate.add_argument(
        "--chat", action="store_true", help="talk: read user turns from stdin, print replies"
    )
    generate.set_defaults(handler=_cmd_generate)


def _add_export(commands: Any) -> None:
    export = commands.add_parser(
        "export", help="write a run as a Hugging Face transformers GPTNeoXForCausalLM folder"
    )
    export.add_argument("path", type=Path, metavar="RUN_OR_CHECKPOINT")
    export.add_argument("--out", type=Path, required=True, help="folder to create")
    export.add_argument(
        "--adapter",
        action="store_true",
        help="a LoRA run's adapters alone, as a PEFT adapter folder (default: the whole model, "
        "adapters merged in)",
    )
    export.set_defaults(handler=_cmd_export)


def _add_compare(commands: Any) -> None:
    compare = commands.add_parser(
        "compare",
        help="plot and tabulate runs side by side (from their metrics.jsonl; no W&B needed)",
    )
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or `latest`)")
    compare.add_argument(
        "--metric",
        action="append",
        dest="metrics",
        metavar="NAME",
        help="metric to plot, e.g. val/loss, train/loss (repeatable; default val/loss)",
    )
    compare.add_argument(
        "--out",
        type=Path,
        help="PNG to write (default comparisons/compare-<yymmdd-HHMMSS>.png, git-ignored)",
    )
    compare.add_argument(
        "--from-step",
        type=int,
        default=0,
        metavar="N",
        help="plot from step N on, so the early loss does not set the y-axis (table unaffected)",
    )
    compare.set_defaults(handler=_cmd_compare)


def _split_train_items(items: Sequence[str]) -> tuple[list[str], list[str]]:
    files = [item for item in items if "=" not in item]
    overrides = [item for item in items if "=" in item]
    return files, overrides


def _cmd_prepare_jsonl(args: argparse.Namespace) -> int:
    from neoxlab.data.jsonl import prepare_jsonl

    result = prepare_jsonl(
        args.inputs,
        args.tokenizer,
        args.out,
        text_key=args.text_key,
        append_eod=args.append_eod,
        eod_token=args.eod_token,
        workers=args.workers,
        on_error=args.on_error,
        progress=not args.no_progress,
    )
    skipped = f", {len(result.bad_lines)} bad lines skipped" if result.bad_lines else ""
    print(
        f"wrote {result.prefix}.bin/.idx: {result.documents:,} documents, {result.tokens:,} "
        f"tokens from {len(result.files)} files ({result.text_bytes / 1e6:,.1f} MB in "
        f"{result.seconds:.1f} s, {result.megabytes_per_second:.1f} MB/s; "
        f"{result.empty} empty texts skipped{skipped})"
    )
    print(f"next: neoxlab train CONFIG data-path={result.prefix} vocab-file={args.tokenizer}")
    return 0


def _cmd_prepare_python_stdlib(args: argparse.Namespace) -> int:
    from neoxlab.data.corpora import prepare_python_stdlib

    report = prepare_python_stdlib(
        args.out,
        include_tests=args.include_tests,
        max_files=args.max_files,
        max_file_bytes=args.max_file_bytes,
        split=args.split,
    )
    print(report.describe())
    print("next: neoxlab train configs/code_completion.yml")
    return 0


def _cmd_prepare_code(args: argparse.Namespace) -> int:
    from neoxlab.data.corpora import prepare_code

    report = prepare_code(
        args.source,
        args.out,
        text_field=args.field,
        hf=args.hf,
        hf_config=args.hf_config,
        hf_split=args.hf_split,
        include_tests=args.include_tests,
        max_files=args.max_files,
        max_file_bytes=args.max_file_bytes,
        split=args.split,
    )
    print(report.describe())
    print(f"next: neoxlab train configs/code_completion.yml data-path={report.out}")
    return 0


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
    from neoxlab import distributed
    from neoxlab.config import load_config
    from neoxlab.tracking import find_run
    from neoxlab.trainer import train

    # Under torchrun every rank runs this; only rank 0 prints.
    is_main = distributed.world_from_environment().is_main
    files, overrides = _split_train_items(args.items)
    auto = args.resume == "auto"
    resume = find_run(args.resume) if args.resume and not auto else None
    if not files and not overrides and resume is None:
        hint = "neoxlab train configs/shakespeare.yml"
        if auto:
            hint = f"{hint} --resume auto (it starts a new run when there is nothing to resume)"
        raise NeoxlabError("no config file given", hint=hint)
    if args.name:
        overrides.append(f"run-name={args.name}")
    if args.wandb:
        overrides.append("use-wandb=true")
    if not files and resume is not None:
        files = [str(resume / "config.yml")]
    config = load_config(files, overrides, notice=None if is_main else lambda _: None)
    if auto or (resume is None and config.load == "latest"):
        # Rank 0 alone searches; the trainer hands its choice to the other ranks.
        resume = _resumable_run(config.run_name) if is_main else None
    elif resume is None and config.load:
        resume = _run_to_load(config.load, is_main)
    if args.dry_run:
        from neoxlab.hf import apply_init_from, init_from_rows
        from neoxlab.memory_check import dry_run_lines

        # init-from decides the model's shape: its config.json is read, not its weights
        config = apply_init_from(config, log=lambda _: None)
        print("\n".join(dry_run_lines(config, init_from_rows(config))))
        return 0
    try:
        result = train(config, config_files=files, resume=resume, progress=not args.no_progress)
    finally:
        distributed.shutdown()
    if not is_main:
        return 0
    best = f"{result.best_val_loss:.4f}" if result.best_val_loss is not None else "n/a"
    print(f"\nrun: {result.run_dir}")
    print(f"step {result.step} | best val loss {best}")
    if not result.finished:
        why = f"{result.stopped_by} received" if result.stopped_by else "stopped early"
        # --resume first: KEY=VALUE overrides appended to the command still parse
        command = shlex.join(["neoxlab", "train", "--resume", str(result.run_dir), *args.items])
        print(f"{why} at step {result.step}; continue with: {command}")
    if result.stopped_by:
        # 128 + the signal number, as the shell reports a process the signal ended: scripts
        # chaining `neoxlab train && ...` must not carry on with an unfinished run.
        return 128 + signal.Signals[result.stopped_by].value
    print(f"try: {_generate_hint(config, result.run_dir)}")
    return 0


def _generate_hint(config: Config, run_dir: Path) -> str:
    """The `neoxlab generate` command that fits the run: chat, or its own sample prompt."""
    command = ["neoxlab", "generate", str(run_dir)]
    if config.data_format == "chat":
        return shlex.join([*command, "--chat"])
    prompt = []
    if config.sample_prompt.strip():
        prompt = ["--prompt", _shell_quote(config.sample_prompt)]
    return " ".join([*map(shlex.quote, command), *prompt, "--max-new-tokens", "200"])


def _shell_quote(text: str) -> str:
    """`text` for bash on one line: $'...' (newlines as \\n) where it holds a newline."""
    if "\n" not in text:
        return shlex.quote(text)
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return f"$'{escaped}'"


def _resumable_run(run_name: str | None) -> Path | None:
    """`--resume auto` (and gpt-neox's `load: latest`): see checkpoint.resumable_run; None,
    saying so, when there is nothing to resume."""
    from neoxlab.checkpoint import resumable_run
    from neoxlab.tracking import RUNS_DIR

    run = resumable_run(run_name)
    if run is None:
        named = f" named {run_name}" if run_name else ""
        base = Path.cwd() / RUNS_DIR
        print(
            f"note: no run{named} under {base} has a checkpoint: starting a new run",
            file=sys.stderr,
        )
    return run  # the trainer says which checkpoint it resumes from


def _run_to_load(load: str, is_main: bool) -> Path | None:
    """gpt-neox's `load: RUN`: continue that run when it has a checkpoint, else start a new run."""
    from neoxlab.checkpoint import run_checkpoint
    from neoxlab.tracking import find_run

    run = None
    if Path(load).expanduser().exists():
        run = find_run(load)
        if run_checkpoint(run) is None:
            run = None
    if run is None and is_main:
        print(f"note: load {load} has no checkpoint yet: starting a new run", file=sys.stderr)
    return run


def _cmd_prepare_chat(args: argparse.Namespace) -> int:
    from neoxlab.config import Config
    from neoxlab.data.chat import ChatOptions, describe, load_prepared_chat, prepare_chat
    from neoxlab.tokenizer import load_tokenizer

    config = Config(
        seq_length=args.seq_length,
        split=args.split,
        chat_user_name=args.user_name,
        chat_agent_name=args.agent_name,
        train_on_prompt=args.train_on_prompt,
    )
    config.validate()
    tokenizer = load_tokenizer(args.tokenizer)
    options = ChatOptions.from_config(config)
    folder = prepare_chat(args.source, tokenizer, options, args.out)
    _, meta = load_prepared_chat(folder, tokenizer, options)
    print(describe(meta))
    print(f"wrote {folder}")
    print(f"next: data-format: chat with data-path: {args.source} (or the folder)")
    return 0


def _with_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """`config` with KEY=VALUE overrides applied."""
    from neoxlab.config import canonical_key, config_from_dict, parse_override

    values = {canonical_key(k): v for k, v in config.to_dict().items()}
    for item in overrides:
        values.update({canonical_key(k): v for k, v in parse_override(item).items()})
    return config_from_dict(values)


def _cmd_compare(args: argparse.Namespace) -> int:
    from neoxlab.compare import compare, default_out
    from neoxlab.tracking import display_path, find_run

    runs = [find_run(spec) for spec in args.runs]
    out = args.out or default_out()
    print(compare(runs, args.metrics or ["val/loss"], out, from_step=args.from_step))
    print(f"\nwrote {display_path(out)}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from neoxlab.data.prepare import build_samplers, prepare_data
    from neoxlab.evaluate import evaluate_run, format_code_metrics
    from neoxlab.hf import load_trained
    from neoxlab.runtime import resolve_runtime

    runtime = resolve_runtime(args.device, "auto", "false")
    trained = load_trained(args.path, runtime.device)
    config = _with_overrides(trained.config, args.overrides)
    data = prepare_data(config)
    if data.tokenizer.to_str() != trained.tokenizer.to_str():
        raise NeoxlabError(
            f"the data's tokenizer {data.tokenizer_file} differs from the checkpoint's",
            hint="tokenize it with the model's own: add "
            f"vocab-file={trained.checkpoint / 'tokenizer.json'} (prepared .bin/.idx data must "
            "have been made with that tokenizer)",
        )
    _, sampler = build_samplers(config, data)
    iters = args.eval_iters or config.eval_iters
    batch_size = config.train_micro_batch_size_per_gpu
    result = evaluate_run(
        trained.model,
        sampler,
        data,
        config,
        batch_size,
        runtime,
        iters=iters,
        progress=not args.no_progress,
    )
    step = trained.state["step"]
    print(f"checkpoint: {trained.checkpoint}" + (f" (step {step})" if step is not None else ""))
    print(
        f"validation loss {result['loss']:.4f} | perplexity {result['ppl']:.2f} | "
        f"next-token accuracy {result['acc']:.3f} ({iters} batches)"
    )
    if config.code_metrics:
        print(
            f"code{format_code_metrics(result)} "
            f"({config.line_completion_samples} validation lines, greedy)"
        )
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from neoxlab.hf import load_trained
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
    if args.chat:
        return _chat(trained, args, generator)
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


def _chat(trained: TrainedModel, args: argparse.Namespace, generator: torch.Generator) -> int:
    """`generate --chat`: user turns from stdin, replies in the chat format the model learned."""
    from neoxlab.data.chat import ChatFormat, Turn
    from neoxlab.tokenizer import encode, token_id

    config, model, tokenizer = trained.config, trained.model, trained.tokenizer
    chat = ChatFormat(config.chat_user_name, config.chat_agent_name, config.eod_token)
    eod_id = token_id(tokenizer, config.eod_token)
    context = model.config.max_position_embeddings
    device = next(model.parameters()).device
    print(f"chatting with {trained.checkpoint} (end with Ctrl-D)")
    turns: list[Turn] = []
    while True:
        try:
            message = input(f"{chat.user_name}: ").strip()
        except EOFError:
            break
        if not message:
            continue
        turns.append(Turn("user", message))
        ids = encode(tokenizer, chat.text(turns, add_generation_prompt=True))
        while len(ids) + args.max_new_tokens > context and len(turns) > 1:
            turns = turns[2:]  # forget the oldest exchange once the context is full
            ids = encode(tokenizer, chat.text(turns, add_generation_prompt=True))
        stream = model.generate(
            torch.tensor([ids], device=device),
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            eos_token_id=eod_id,
            generator=generator,
        )
        new_ids = [int(token[0]) for token in stream]
        reply = chat.reply(tokenizer.decode(new_ids, skip_special_tokens=True))
        print(f"{chat.agent_name}: {reply}")
        turns.append(Turn("agent", reply))
    print()
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from neoxlab.hf import export_adapter, export_hf

    if args.adapter:
        out = export_adapter(args.path, args.out)
        print(f"load it with peft.PeftModel.from_pretrained(<the base model>, {str(out)!r})")
        return 0
    out = export_hf(args.path, args.out)
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        # argparse ends the CONFIG|KEY=VALUE list at the first option (`a=1 --wandb b=2`):
        # what follows comes back here and joins the list; anything else is a mistake.
        positional = "items" if hasattr(args, "items") else "overrides"
        if extra and hasattr(args, positional) and not any(e.startswith("-") for e in extra):
            setattr(args, positional, [*getattr(args, positional), *extra])
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        return args.handler(args)
    except NeoxlabError as err:
        print(textwrap.shorten(err.line(), 2000), file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`neoxlab generate ... | head`): stop quietly, as `cat` does.
        # stdout goes to /dev/null first, or Python's flush at exit raises the same error again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except OSError as err:
        # A full disk or a folder without write permission is the user's to fix, wherever it
        # strikes: one line, as for NeoxlabError. Anything else is a bug and keeps its traceback.
        if err.errno not in DISK_ERRORS:
            raise
        where = f"{err.filename}: " if err.filename else ""
        hint = "free disk space or fix the permissions"
        print(f"error: {where}{err.strerror} (hint: {hint})", file=sys.stderr)
        return EXIT_USER_ERROR
