#!/usr/bin/env bash
# The algorithm comparison of docs/algorithms.md: one CPU-sized code model trained with AdamW,
# SGD, Lion and Muon (configs/experiments/, each at its documented learning rate), under the
# cosine and warmup-stable-decay schedules, with seeds 1 and 2: 16 runs of 600 steps x 2,048
# tokens each, one after another, then `neoxlab compare` per schedule and a per-optimizer summary.
#
#   scripts/compare_algorithms.sh [WORKDIR]        # default ./algorithms-compare
#
# Everything (prepared data, tokenizer, runs/, logs/, PNGs, tables) lands in WORKDIR, never in the
# repository. A run that already finished (its summary.json exists) is skipped, so the script can
# be stopped and started again. OPTIMIZERS, SCHEDULES, SEEDS and OMP_NUM_THREADS (default 1: one
# core) may be set in the environment to run part of the matrix.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-algorithms-compare}
optimizers=${OPTIMIZERS:-adamw sgd lion muon}
schedules=${SCHEDULES:-cosine wsd}
seeds=${SEEDS:-1 2}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-$OMP_NUM_THREADS}  # tokenizer training

# The CPU-sized model and budget: 1.8M parameters (1.3M outside the embedding), a 4,096-token BPE,
# 600 steps x 8 sequences x 256 tokens = 1.23M tokens (~0.4 of an epoch of the stdlib), evaluated
# every 100 steps on 20 fixed validation windows and 64 fixed line completions. No checkpoints.
cpu_sized=(
  hidden-size=128 num-layers=4 num-attention-heads=4 seq-length=256 vocab-size=4096
  micro-batch-size=8 global-batch-size=8 train-iters=600
  eval-interval=100 eval-iters=20 log-interval=10 save=false
)

mkdir -p "$work/logs"
cd "$work"
[[ -f data/python_stdlib.jsonl ]] || neoxlab prepare python-stdlib --out data

# Seed 1 of every cell first, so a stopped matrix still has each optimizer x schedule once.
for seed in $seeds; do
  for schedule in $schedules; do
    for optimizer in $optimizers; do
      name=$optimizer-$schedule-s$seed
      if compgen -G "runs/$name-*/summary.json" > /dev/null; then
        echo "done already: $name"
        continue
      fi
      echo "$(date +%H:%M:%S) training $name"
      neoxlab train "$repo/configs/code_completion.yml" \
        "$repo/configs/experiments/$optimizer.yml" "$repo/configs/experiments/$schedule.yml" \
        data-path=data/python_stdlib.jsonl "${cpu_sized[@]}" seed="$seed" \
        --name "$name" --no-progress > "logs/$name.log" 2>&1
    done
  done
done

for schedule in $schedules; do
  neoxlab compare runs/*-"$schedule"-s*-* --metric val/loss --metric val/bits_per_byte \
    --from-step 100 --out "compare_$schedule.png" | tee "compare_$schedule.txt"
done
python "$repo/scripts/summarize_runs.py" runs/* | tee summary.md
