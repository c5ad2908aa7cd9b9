#!/usr/bin/env bash
# The trade-off grid of docs/results/synthetic/tradeoff_<target>/: adaptation (target DSC) against forgetting
# (retained source DSC) on the multisite and site_shift targets, 1 and 5 shots, seeds 0-2.
# Resumable: every invocation skips the cells that have a result, so rerun the script after an interruption.
# Seed 0 of every configuration runs first, then seeds 1 and 2; the two targets run side by side (1 thread each).
# Usage: bash docs/results/synthetic/run_tradeoff.sh
#   CACHE=/path keeps the phantoms and the foundation elsewhere; BUNDLE=/path/to/ln_ct_dynunet runs another copy.
set -uo pipefail
cd "$(dirname "$0")/../../.."
cache=${CACHE:-/work/bench-cache}
common=(--cache "$cache" --bundle "${BUNDLE:-ln_ct_dynunet}" --preset tiny --pretrain_epochs 80 --max_epochs 20 --iterations_per_epoch 25
        --threads 1 --noprogress --shots 1,5)
run() {
    local target=$1
    shift
    dgst-monai benchmark --output "docs/results/synthetic/tradeoff_$target" --target "$target" "${common[@]}" "$@"
}
# the data of both targets, the source test set and the foundation model (pre-trained once, cached)
run multisite --methods "" --seeds 0
run site_shift --methods "" --seeds 0
for seeds in 0 0,1,2; do
    for target in multisite site_shift; do
        (
            run "$target" --methods full,bias_norm_head,norm,lora,dgst --gamma 10 --update strict,gradient --seeds "$seeds"
            run "$target" --methods full,dgst --lr 1e-4,3e-4,1e-2 --seeds "$seeds"
        ) &
    done
    wait
done
