#!/usr/bin/env bash
# The architecture comparison of docs/architectures.md: one CPU-sized code model with Pythia's
# block, with Llama's, and with each single change (RMSNorm, SwiGLU, grouped-query attention,
# tied embeddings; configs/experiments/), at the same parameter count (within 0.4%) and the same
# tokens (600 steps x 2,048), trained with AdamW and warmup-stable-decay (docs/algorithms.md's
# best recipe) for seeds 1, 2 and 3: 18 runs, one after another, then `neoxlab compare` and a
# per-variant summary.
#
#   scripts/compare_architectures.sh [WORKDIR]        # default ./architectures-compare
#
# Everything (prepared data, tokenizer, runs/, logs/, PNGs, tables) lands in WORKDIR, never in the
# repository. A run that already finished (its summary.json exists) is skipped, so the script can
# be stopped and started again. VARIANTS, SEEDS and OMP_NUM_THREADS (default 1: one core) may be
# set in the environment to run part of the matrix.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-architectures-compare}
variants=${VARIANTS:-pythia llama rmsnorm swiglu gqa tied}
seeds=${SEEDS:-1 2 3}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-$OMP_NUM_THREADS}  # tokenizer training

# docs/algorithms.md's CPU-sized model and budget: hidden 128, 4 layers, 4 heads, a 4,096-token
# BPE, 600 steps x 8 sequences x 256 tokens = 1.23M tokens, evaluated every 100 steps on 20 fixed
# validation windows and 64 fixed line completions. No checkpoints.
cpu_sized=(
  hidden-size=128 num-layers=4 num-attention-heads=4 seq-length=256 vocab-size=4096
  micro-batch-size=8 global-batch-size=8 train-iters=600
  eval-interval=100 eval-iters=20 log-interval=10 save=false
)
recipe=("$repo/configs/experiments/adamw.yml" "$repo/configs/experiments/wsd.yml")

# Each variant's files and the MLP width that keeps Pythia's 1,841,920 parameters (its GELU MLP
# is 4 x 128 = 512 wide): SwiGLU's three matrices at intermediate-size 1024 (gpt-neox's ⅔ rule:
# two halves of 341) weigh what GELU's two of 512 do; two key/value heads of four take 128 x 128
# from the key and value projections per layer, which the MLP gets back at 512 + 64; tying frees
# the 4,096 x 128 output layer, spread over 4 layers at 512 + 4,096 / 8.
variant_arguments() {
  local experiments=$repo/configs/experiments
  case $1 in
    pythia) ;;
    llama) echo "$experiments/llama.yml intermediate-size=1024" ;;
    rmsnorm) echo "$experiments/rmsnorm.yml" ;;
    swiglu) echo "$experiments/swiglu.yml intermediate-size=1024" ;;
    gqa) echo "$experiments/gqa.yml intermediate-size=576" ;;
    tied) echo "$experiments/tied_embeddings.yml intermediate-size=1024" ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}

mkdir -p "$work/logs"
cd "$work"
[[ -f data/python_stdlib.jsonl ]] || neoxlab prepare python-stdlib --out data

# Seed 1 of every variant first, so a stopped matrix still has each variant once.
for seed in $seeds; do
  for variant in $variants; do
    name=$variant-s$seed
    if compgen -G "runs/$name-*/summary.json" > /dev/null; then
      echo "done already: $name"
      continue
    fi
    read -r -a arguments <<< "$(variant_arguments "$variant")"
    echo "$(date +%H:%M:%S) training $name"
    neoxlab train "$repo/configs/code_completion.yml" "${recipe[@]}" \
      data-path=data/python_stdlib.jsonl "${cpu_sized[@]}" "${arguments[@]}" seed="$seed" \
      --name "$name" --no-progress > "logs/$name.log" 2>&1
  done
done

neoxlab compare runs/*-s1-* --metric val/loss --metric val/bits_per_byte --from-step 100 \
  --out compare_seed1.png | tee compare_seed1.txt
neoxlab compare runs/pythia-s*-* runs/llama-s*-* --metric val/loss --from-step 100 \
  --out compare_pythia_llama.png | tee compare_pythia_llama.txt
python "$repo/scripts/summarize_runs.py" runs/* --by run-name | tee summary.md
