"""`neoxlab prepare jsonl` against its ceiling, HF tokenizers alone, and its peak memory.

On the same generated C4-like jsonl (prepare_jsonl.py's generator, 100 MB by default) and the
same tokenizer, in one process and alternating (ceiling, pipeline, ceiling, ...): the texts
already parsed into memory and tokenized by `encode_batch` in the pipeline's chunk sizes (the
ceiling the issue names), the same with `encode_batch_fast` (what the pipeline calls: the same
ids without character offsets), and the whole pipeline (read, parse JSON, tokenize, write the
.bin/.idx) with one process. Then `neoxlab prepare jsonl` as a command on 50 MB and on 200 MB,
each in its own process, for its peak resident memory (it must not grow with the input).

    python bench/prepare_ceiling.py [--megabytes 100] [--rss-megabytes 50 200] [--record]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import common
import prepare_jsonl
from tokenizers import Tokenizer

from neoxlab.data.jsonl import CHUNK_BYTES
from neoxlab.data.jsonl import prepare_jsonl as run_pipeline

HEADERS = ["measured", "input MB", "seconds", "MB/s", "of encode_batch's MB/s", "peak RSS MB"]


def generated(folder: Path, megabytes: float) -> Path:
    """prepare_jsonl.py's C4-like jsonl of about `megabytes` MB in a new `folder`."""
    folder.mkdir()
    return prepare_jsonl.generate(folder, megabytes)[0]


def chunked_texts(path: Path) -> list[list[str]]:
    """The records' texts, grouped as the pipeline groups lines (about CHUNK_BYTES each)."""
    chunks: list[list[str]] = [[]]
    size = 0
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            chunks[-1].append(json.loads(line)["text"])
            size += len(line)
            if size >= CHUNK_BYTES:
                chunks.append([])
                size = 0
    return [chunk for chunk in chunks if chunk]


def tokenize_only(tokenizer: Tokenizer, chunks: list[list[str]], fast: bool) -> Callable[[], None]:
    encode = tokenizer.encode_batch_fast if fast else tokenizer.encode_batch

    def run() -> None:
        for texts in chunks:
            encode(texts)

    return run


def peak_rss_megabytes(source: Path, tokenizer_file: Path, out: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of `neoxlab prepare jsonl` on `source`, in a process alone."""
    command = [sys.executable, "-m", "neoxlab", "prepare", "jsonl", str(source)]
    command += ["--tokenizer", str(tokenizer_file), "--out", str(out), "--no-progress"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {process.returncode}")
    return seconds, usage.ru_maxrss / 1024  # Linux reports kilobytes


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=100)
    parser.add_argument("--rss-megabytes", type=float, nargs="+", default=[50, 200])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: trained here)")
    args = parser.parse_args(argv)
    vocab = prepare_jsonl.GPT_NEOX_20B_VOCAB
    if args.smoke:
        args.megabytes, args.rss_megabytes, args.rounds, vocab = 0.05, [0.05, 0.2], 1, 300
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer_file = args.tokenizer or prepare_jsonl.shakespeare_tokenizer(folder, vocab)
        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        source = generated(folder / "main", args.megabytes)
        megabytes = source.stat().st_size / 1e6
        chunks = chunked_texts(source)
        contenders: dict[str, Callable[[], None]] = {
            "encode_batch alone (texts in memory)": tokenize_only(tokenizer, chunks, fast=False),
            "encode_batch_fast alone (texts in memory)": tokenize_only(tokenizer, chunks, True),
            "neoxlab prepare jsonl (read, parse, tokenize, write)": lambda: run_pipeline(
                [source], tokenizer_file, folder / "out", progress=False
            ),
        }
        seconds: dict[str, list[float]] = {name: [] for name in contenders}
        for round_index in range(args.rounds):
            order = list(contenders.items())
            for name, run in order if round_index % 2 == 0 else reversed(order):
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
        ceiling = megabytes / statistics.median(next(iter(seconds.values())))
        for name, taken in seconds.items():
            rate = megabytes / statistics.median(taken)
            rows.append([name, f"{megabytes:.1f}", f"{statistics.median(taken):.1f}"])
            rows[-1] += [f"{rate:.2f}", f"{rate / ceiling:.2f}", "-"]
        for size in args.rss_megabytes:
            data = generated(folder / f"rss{size}", size)
            taken, rss = peak_rss_megabytes(data, tokenizer_file, folder / f"rss{size}" / "out")
            rate = data.stat().st_size / 1e6 / taken
            rows.append(["neoxlab prepare jsonl, own process (startup included)"])
            rows[-1] += [f"{data.stat().st_size / 1e6:.1f}", f"{taken:.1f}", f"{rate:.2f}"]
            rows[-1] += [f"{rate / ceiling:.2f}", f"{rss:.0f}"]
    print(f"{os.cpu_count()} CPU cores, tokenizer {tokenizer_file.name} ({vocab:,} tokens)")
    common.report(
        args.record,
        "Data preparation: pipeline vs tokenizer ceiling, peak memory",
        HEADERS,
        rows,
        common.bench_device(smoke=True),  # tokenization runs on the CPU
        __file__,
        argv,
    )
    return rows


if __name__ == "__main__":
    main()
