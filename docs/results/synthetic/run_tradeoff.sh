#!/usr/bin/env bash
# The trade-off grid of docs/results/synthetic/tradeoff_<target>/: adaptation (target DSC) against forgetting
# (retained source DSC) on the multisite and site_shift targets, 1 and 5 shots, seeds 0-2.
# Resumable: every invocation skips the cells that have a result, so rerun the script after an interruption.
# The two targets run side by side (1 thread each). The tiny preset keeps the 170 cells to about 6 CPU hours here;
# the cpu_small network (8x the voxels per patch, twice the filters) would take many times that.
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
# The foundation model the committed cells started from (pre-trained here once, 2,000 iterations on the source
# phantoms): seeding the cache with it lets a later sitting resume the grid from the same weights. Its folder name
# is the hash of its pre-training settings (this checkout's bundle path and the cache path included); elsewhere the
# runner pre-trains a new one and refuses the committed folders, whose protocol names the old one.
mkdir -p "$cache" && cp -rn docs/results/synthetic/tradeoff_foundation/foundation_* "$cache"/
# the data of both targets and the source test set (phantoms rebuilt from their seeds)
run multisite --methods "" --seeds 0
run site_shift --methods "" --seeds 0
# Seed 0 first, in the order that answers the first question soonest: Full, Bias+Norm+Head and DGST, then the
# learning-rate axis, then the other methods and DGST's update modes and gamma 10; then seed 1, then seed 2, the same
# way (a run that grows by a seed adds that seed's few-shot subsets to splits.json and keeps the others).
for seeds in 0 0,1 0,1,2; do
    for target in multisite site_shift; do
        (
            run "$target" --methods full,bias_norm_head,dgst --seeds "$seeds"
            run "$target" --methods full,dgst --lr 1e-4,3e-4,1e-2 --seeds "$seeds"
            run "$target" --methods full,bias_norm_head,norm,lora,dgst --gamma 10 --update strict,gradient --seeds "$seeds"
        ) &
    done
    wait
done
