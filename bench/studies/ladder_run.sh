#!/usr/bin/env bash
# The ladder on the embedded SmolLM2 (docs/recipes.md "The ladder"), as run for issue 27 on 2 shared cores:
# ffn_down x the low-bit candidates (the only SmolLM2 matrix whose rows the K-quants' 256-blocks divide), without
# and with an importance matrix, then a recipe at every preset size below 5 bpw against that preset, on 4 held-out
# WikiText windows and 4 windows of a text that is not WikiText, with the closed loop at the two lowest sizes.
# Accuracy only: the timings printed here come from a loaded machine and are not benchmarks.
set -euo pipefail
cd "$(dirname "$0")/../.."
export SWEEP_CACHE=${SWEEP_CACHE:-$PWD/.cache/sweep}  # the text: the embedded WikiText-2 unless SWEEP_WIKITEXT says otherwise
PY=${PY:-python}
OTHER=${OTHER:-/usr/share/common-licenses/GPL-3}  # the GNU GPL v3 text shipped by Debian's base-files: not WikiText
GRID="'layer=range(0,30)' tensor=ffn_down kind=weight fmt=q2_K,q3_K,iq4_xs,q4_K,q6_K data.n_windows=2 \
 metrics.generate=false metrics.rank_by=kld_mean run.threads=1 run.store=runs/store"
eval $PY -m sweep $GRID hydra.sweep.dir=runs/grid-ffn_down
$PY -m sweep.imatrix out=runs/smollm2.imatrix.gguf data.n_windows=2 run.threads=1
eval $PY -m sweep $GRID fmt.imatrix=runs/smollm2.imatrix.gguf hydra.sweep.dir=runs/grid-ffn_down-imatrix
# (as run for issue 27: the imatrix grid was stopped after layers 0-15 for time, and its finished points copied
# to runs/grid-ffn_down-imatrix-done; the other 14 ffn_down then keep the preset's type at every size)
COMMON="--types q2_K,q3_K,iq4_xs,q4_K,q6_K --validate --heldout-windows 4 --heldout-text $OTHER --threads 1"
$PY -m sweep.recipe runs/grid-ffn_down --sizes Q2_K,Q3_K_S,Q3_K_M,IQ4_XS,Q4_K_S,Q4_K_M --out runs/ladder \
  $COMMON --loop-sizes Q2_K,Q3_K_S --loop-blocks 10 --loop-budget 8 2>&1 | tee runs/ladder.log
$PY -m sweep.recipe runs/grid-ffn_down-imatrix --imatrix runs/smollm2.imatrix.gguf \
  --sizes IQ2_XS,IQ3_XXS,Q2_K,Q3_K_M,IQ4_XS,Q4_K_M --out runs/ladder-imatrix $COMMON 2>&1 | tee runs/ladder-imatrix.log
