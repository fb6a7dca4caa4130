"""Both notebooks with their default (T4-sized) parameters on a CUDA GPU standing in for a T4.

A Colab T4 (compute capability 7.5) trains in fp16, without torch.compile, and its attention
has neither the flash nor the cuDNN kernel (SDPA uses the memory-efficient one). On a bigger GPU
this script forces the same: `precision=fp16`, `compile=false`, and the flash and cuDNN SDPA
backends switched off in the kernel by an IPython startup file. It prints one bench/RESULTS.md
row per notebook (wall time, peak GPU memory reserved, the main run's final validation loss)
and exits 1 if a notebook's peak exceeds 12 GiB (a T4 shows about 14.5 GiB usable). A bigger
GPU is faster than a T4: its wall times are lower bounds for a T4's.

    python bench/notebooks_t4.py [--data-mirror DIR] [--out DIR]
    python bench/notebooks_t4.py --device cpu --parameters '{"train_iters": 4, ...}'  # smoke test

Needs the dev extra (papermill, ipykernel) and Tiny Shakespeare (NEOXLAB_DATA_MIRROR, or
--data-mirror, offline). W&B runs offline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path

import papermill

from neoxlab.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("shakespeare_training_notebook.ipynb", "code_completion_notebook.ipynb")
PEAK_LIMIT_GIB = 12.0
# Run in the kernel before the notebook's first cell: attention kernels a T4 does not have.
T4_STARTUP = """\
import torch

torch.backends.cuda.enable_flash_sdp(False)
torch.backends.cuda.enable_cudnn_sdp(False)
"""
PEAK_LINE = re.compile(r"peak GPU memory: ([\d.]+) GiB allocated, ([\d.]+) GiB reserved")


def run_notebook(name: str, folder: Path, device: str, extra: dict) -> dict:
    parameters = {
        "device": device,
        "precision": "fp16" if device == "cuda" else "auto",
        "work_dir": str(folder / "work"),
        "repo_dir": str(ROOT),
        **extra,
        "model_overrides": ["compile=false", *extra.get("model_overrides", [])],
    }
    folder.mkdir(parents=True, exist_ok=True)
    executed = folder / name
    started = time.perf_counter()
    notebook = papermill.execute_notebook(
        str(ROOT / "notebooks" / name),
        str(executed),
        parameters=parameters,
        cwd=str(folder),
        kernel_name="python3",
        progress_bar=False,
    )
    seconds = time.perf_counter() - started
    final_output = "".join(
        output.get("text", "") for output in notebook.cells[-1].outputs if "text" in output
    )
    peak = PEAK_LINE.search(final_output)
    main_run = next((folder / "work" / "runs").glob("main-*"))
    val_losses = [m["val/loss"] for m in read_metrics(main_run) if "val/loss" in m]
    return {
        "notebook": name,
        "minutes": seconds / 60,
        "allocated_gib": float(peak.group(1)) if peak else None,
        "reserved_gib": float(peak.group(2)) if peak else None,
        "final_val_loss": val_losses[-1],
    }


def describe_device(device: str) -> str:
    if device != "cuda":
        return device
    import torch

    return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-mirror", type=Path, help="folder with tinyshakespeare/input.txt")
    parser.add_argument("--out", type=Path, help="keep the executed notebooks and runs here")
    parser.add_argument(
        "--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test)"
    )
    parser.add_argument("--parameters", default="{}", help="JSON: more notebook parameters")
    args = parser.parse_args()
    extra = json.loads(args.parameters)
    folder = args.out or Path(tempfile.mkdtemp(prefix="notebooks-t4-"))
    startup = folder / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True, exist_ok=True)
    (startup / "00-t4.py").write_text(T4_STARTUP)
    os.environ["IPYTHONDIR"] = str(folder / "ipython")
    os.environ["WANDB_MODE"] = "offline"
    os.environ.setdefault("NEOXLAB_CACHE", str(folder / "cache"))
    if args.data_mirror:
        os.environ["NEOXLAB_DATA_MIRROR"] = str(args.data_mirror.resolve())
    git = ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True, check=False).stdout.strip()
    device = describe_device(args.device)
    over_limit = False
    columns = ["date", "device", "commit", "notebook", "minutes", "peak GPU memory reserved"]
    print("| " + " | ".join([*columns, "final val loss"]) + " |")
    print("|" + "---|" * (len(columns) + 1))
    for name in NOTEBOOKS:
        row = run_notebook(name, folder / Path(name).stem, args.device, extra)
        reserved, allocated = row["reserved_gib"], row["allocated_gib"]
        peak = "-" if reserved is None else f"{reserved:.2f} GiB ({allocated:.2f} GiB allocated)"
        over_limit |= reserved is not None and reserved > PEAK_LIMIT_GIB
        print(
            f"| {time.strftime('%Y-%m-%d')} | {device} | {commit} | `{name}` | "
            f"{row['minutes']:.1f} | {peak} | {row['final_val_loss']:.4f} |",
            flush=True,
        )
    print(f"executed notebooks and runs: {folder}")
    return 1 if over_limit else 0


if __name__ == "__main__":
    raise SystemExit(main())
