#!/usr/bin/env bash
# The setup step of every task in skypilot/. SkyPilot runs it on each node, in the workdir
# (~/sky_workdir, this repository as uploaded from your machine), once when a cluster is
# launched and again on every new VM a managed job recovers onto, so it must be safe to repeat.
#
#   PREPARE  arguments of `neoxlab prepare` for a corpus `neoxlab train` does not make by itself,
#            e.g. "python-stdlib" for configs/code_completion.yml (empty: nothing to prepare;
#            Tiny Shakespeare is downloaded by `neoxlab train`)
#
# It reads no secret: WANDB_API_KEY reaches only the run step (skypilot/run.sh).
set -euo pipefail

# From the workdir, so the VM runs exactly the code you launched. On a Linux GPU VM pip brings
# PyTorch's CUDA build (a few GB): most of setup's few minutes.
pip install --progress-bar off -e ".[wandb]"

if [ -n "${PREPARE:-}" ]; then
  read -ra prepare <<< "$PREPARE"
  neoxlab prepare "${prepare[@]}"
fi
