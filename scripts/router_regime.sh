#!/usr/bin/env bash
# Regime checks of the router study's sparse routers at the vision study's 1-epoch budget
# (experiment=router_study_budget: 156 steps, one image of 49 patches per routing group), three seeds
# each, tabulated by core.compare into docs/router_regime.md. Soft MoE's own check (logit scale and
# normalisation) is docs/soft_moe_regime.md; this one asks the same question of the others: does a
# setting that only matters at this scale (capacity at a 49-token group, training noise) decide the
# ranking?
#   scripts/router_regime.sh          # about 30 minutes on 2 CPU cores
# The dense ViT at the same budget is the baseline of every difference.
# - topk (V-MoE top-2, capacity factor 1.05 per image: 13 slots per expert for 98 choices, so about an
#   eighth of the choices are dropped): capacity factor 2.0, which drops almost nothing; and no training
#   noise (noise_std=0, with the load loss, which needs the noise, off).
# - expert_choice (capacity factor 2: each expert takes 13 of the 49 patches): no training noise, and
#   capacity factor 1 (each expert takes 7, the top-1 compute).
# A sweep whose directory holds a .done marker is skipped, so the script resumes after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=multirun/router_regime
. scripts/sweeps.sh
RUN="python -m vision.train -m experiment=router_study_budget seed=0,1,2"
commands=(
  "$RUN +router=topk router.capacity_factor=1.05,2.0 hydra.sweep.dir=$OUT/topk_capacity"
  "$RUN +router=topk router.noise_std=0.0 router.load_loss_weight=0.0 hydra.sweep.dir=$OUT/topk_no_noise"
  "$RUN +router=expert_choice router.noise_std=1.0,0.0 hydra.sweep.dir=$OUT/expert_choice_noise"
  "$RUN +router=expert_choice router.capacity_factor=1.0 hydra.sweep.dir=$OUT/expert_choice_capacity"
  "$RUN model.moe=false hydra.sweep.dir=$OUT/dense"
)
run_sweeps "${commands[@]}"

compare_args "${commands[@]}"
python -m core.compare $OUT --out $OUT/compare --page docs/router_regime.md \
  --title "Regime checks of top-2 and expert choice at the vision study's budget" "${COMPARE_ARGS[@]}"
