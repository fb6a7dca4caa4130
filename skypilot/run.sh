#!/usr/bin/env bash
# The run step of every task in skypilot/. SkyPilot runs it on each node, in the workdir, with
# the task's envs and its own SKYPILOT_* variables. One node with one GPU runs `neoxlab train`;
# otherwise one torchrun per node starts a process per GPU, as scripts/slurm/train.sbatch does,
# so the same configs and knobs work (GPUS_PER_NODE, RDZV_PORT, OMP_NUM_THREADS).
#
#   CONFIG       config file(s), relative to the workdir, separated by spaces (required)
#   ARGS         more `neoxlab train` arguments, separated by spaces: KEY=VALUE overrides, ...
#   NAME         the run's name (default: the first config file's name). Like the Slurm script,
#                this adds `--resume auto`: launched again under the same name (a relaunch, a
#                managed job recovered after preemption), the run continues from its newest
#                complete checkpoint; a new name starts a new run.
#   RUNS_FOLDER  a bucket mount to keep runs/ in (empty: runs/ stays in the workdir, on the VM)
#   WANDB_API_KEY  passed with `sky launch ... --secret WANDB_API_KEY`: W&B logs online
set -euo pipefail

: "${CONFIG:?set CONFIG, e.g. sky launch ... --env CONFIG=configs/shakespeare.yml}"
read -ra configs <<< "$CONFIG"
read -ra arguments <<< "${ARGS:-}"
first_config=$(basename "${configs[0]}")
name=${NAME:-${first_config%.*}}

if [ -n "${RUNS_FOLDER:-}" ]; then
  # runs/ in the workdir points into the bucket: paths stay relative to the workdir (CONFIG,
  # ARGS, the runs/<run> neoxlab prints), every node reads the same checkpoints, and they
  # outlive the VM, which is what lets a recovered managed job resume.
  if [ -e runs ] && [ ! -L runs ]; then
    echo "error: runs/ in $PWD is a folder; move it so runs/ can point at $RUNS_FOLDER/runs" >&2
    exit 2
  fi
  mkdir -p "$RUNS_FOLDER/runs"
  ln -sfn "$RUNS_FOLDER/runs" runs
fi

# A key handed over is the request for W&B: without --wandb it would go unused.
if [ -n "${WANDB_API_KEY:-}" ]; then
  arguments+=(--wandb)
fi

train=(train "${configs[@]}" "${arguments[@]}" --name "$name" --resume auto --no-progress)
nodes=${SKYPILOT_NUM_NODES:-1}
gpus=${GPUS_PER_NODE:-${SKYPILOT_NUM_GPUS_PER_NODE:-1}}
if [ "$gpus" -lt 1 ]; then
  gpus=1  # a CPU-only node: one process
fi
# Data loading is light (random windows from a memory map): leave the cores to the GPUs' feeders.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if [ "$nodes" -eq 1 ] && [ "$gpus" -eq 1 ]; then
  exec neoxlab "${train[@]}"
fi

# SkyPilot numbers the nodes and lists their IPs head first: a static rendezvous on the head
# puts global rank 0, the one that writes the run, on node 0.
head_ip=$(head -n 1 <<< "$SKYPILOT_NODE_IPS")
port=${RDZV_PORT:-29500}
echo "node $SKYPILOT_NODE_RANK of $nodes: $gpus processes, rendezvous $head_ip:$port"
exec python -m torch.distributed.run \
  --nnodes="$nodes" \
  --nproc_per_node="$gpus" \
  --node_rank="$SKYPILOT_NODE_RANK" \
  --master_addr="$head_ip" \
  --master_port="$port" \
  -m neoxlab "${train[@]}"
