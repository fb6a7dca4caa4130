"""Throughput of `neoxlab prepare jsonl` on ~100 MB of generated C4-like jsonl.

Documents are random runs of Tiny Shakespeare lines (about 2 KB each, like C4's), written as
plain .jsonl and as .jsonl.zst in a temporary folder. The tokenizer is a byte-level BPE trained
on Tiny Shakespeare with GPT-NeoX-20B's vocabulary size (the real 20B tokenizer.json cannot be
downloaded here; pass --tokenizer to use it). Prints one row per configuration: MB/s of text.

    python bench/prepare_jsonl.py [--megabytes 100] [--tokenizer PATH/tokenizer.json] [--record]
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path

import common
import zstandard

from neoxlab.data.corpora import fetch_shakespeare
from neoxlab.data.jsonl import prepare_jsonl
from neoxlab.tokenizer import read_text, train_bpe

GPT_NEOX_20B_VOCAB = 50277
HEADERS = ["input", "workers", "seconds", "MB/s", "notes"]  # RESULTS.md's columns


def generate(folder: Path, megabytes: float, seed: int = 0) -> list[Path]:
    lines = [line for line in read_text(fetch_shakespeare()).splitlines() if line.strip()]
    rng = random.Random(seed)
    plain = folder / "c4like.jsonl"
    written = 0
    with open(plain, "w", encoding="utf-8") as handle:
        while written < megabytes * 1e6:
            start = rng.randrange(len(lines))
            text = "\n".join(lines[start : start + rng.randint(10, 80)])
            record = json.dumps({"text": text, "url": f"https://example.org/{written}"}) + "\n"
            handle.write(record)
            written += len(record.encode())
    compressed = folder / "zst" / "c4like.jsonl.zst"
    compressed.parent.mkdir()
    with open(plain, "rb") as source, open(compressed, "wb") as target:
        zstandard.ZstdCompressor(level=3).copy_stream(source, target)
    return [plain, compressed]


def shakespeare_tokenizer(folder: Path, vocab: int) -> Path:
    """A byte-level BPE of `vocab` tokens trained on Tiny Shakespeare, saved in `folder`."""
    tokenizer_file = folder / "tokenizer.json"
    train_bpe([read_text(fetch_shakespeare())], vocab).save(str(tokenizer_file))
    return tokenizer_file


def main(argv: list[str] | None = None) -> list[list[object]]:
    parser = common.parser(__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=float, default=100)
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: trained here)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)
    vocab = GPT_NEOX_20B_VOCAB
    if args.smoke:
        args.megabytes, args.workers, vocab = 0.05, [1], 300
    rows: list[list[object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer_file = args.tokenizer or shakespeare_tokenizer(folder, vocab)
        plain, compressed = generate(folder, args.megabytes)
        print(f"input: {plain.stat().st_size / 1e6:.1f} MB jsonl, {os.cpu_count()} CPU cores")
        for source in (plain, compressed):
            for workers in args.workers:
                start = time.perf_counter()
                result = prepare_jsonl(
                    [source], tokenizer_file, folder / "out", workers=workers, progress=False
                )
                seconds = time.perf_counter() - start
                rows.append(
                    [
                        f"{source.name} ({result.text_bytes / 1e6:.1f} MB)",
                        workers,
                        f"{seconds:.1f}",
                        f"{result.text_bytes / 1e6 / seconds:.1f}",
                        f"{result.documents:,} documents, {result.tokens:,} tokens",
                    ]
                )
    device = common.bench_device(smoke=True)  # tokenization runs on the CPU
    common.report(
        args.record,
        "Data preparation: `neoxlab prepare jsonl`",
        HEADERS,
        rows,
        device,
        __file__,
        argv,
    )
    return rows


if __name__ == "__main__":
    main()
