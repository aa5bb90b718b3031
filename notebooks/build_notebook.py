"""Writes sensitivity.ipynb (no outputs). The notebook's logic lives in sweep/plots.py; edit that, not cells."""

from pathlib import Path

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md("# Precision sensitivity of a GGUF model\n\n"
       "Reads the results table of a sweep: the path in `SWEEP_RESULTS` (a sweep directory or a "
       "`results.parquet`/`.csv`), or else the newest sweep under `runs/`. Every figure comes from "
       "`sweep.plots`, the same module behind `python -m sweep.report DIR --plots OUT`."),
    code("import os\n\nfrom IPython.display import display\n\n"
         "from sweep.plots import heatmaps, load_results, proxy_scatter, sensitivity_curves\n"
         "from sweep.records import ranking\n\n"
         "df = load_results(os.environ.get('SWEEP_RESULTS'))\n"
         "has_kld = 'kld_mean' in df and df['kld_mean'].notna().any()\n"
         "print(f\"{len(df)} points: {df['status'].value_counts().to_dict()}\")\n"
         "print('model', df['model'].iloc[0], '| container', df['container'].iloc[0], "
         "'| windows', df['n_windows'].iloc[0], '| n_ctx', df['n_ctx'].iloc[0])"),
    md("## Sensitivity curves\n\n"
       "ΔPPL against the matching baseline, per layer: one line per (tensor, kind), one panel per format. "
       "The band is ±1 paired standard error (per-window ΔNLL); a line inside its band around zero is not "
       "distinguishable from no effect at this slice size. **Hollow grey circles are no-ops**: the format left "
       "every value unchanged (e.g. norm weights already exact in bf16) — nothing was measured, which is not the "
       "same as \"insensitive\". Red crosses are failed or diverged points."),
    code("fig = sensitivity_curves(df, 'delta_ppl')"),
    md("The same curves in KL divergence (baseline ‖ run), on a log scale. KL sees effects far below what "
       "perplexity can resolve: use it to rank, and ΔPPL to judge whether a change matters."),
    code("if has_kld:\n    fig = sensitivity_curves(df, 'kld_mean')"),
    md("## Heatmap: layer × tensor\n\n"
       "Darker is more damage. Hatched grey cells are no-ops; white cells were not measured."),
    code("fig = heatmaps(df, 'kld_mean' if has_kld else 'delta_ppl')"),
    md("## Ranking\n\n"
       "Most sensitive first. `delta_nll_p` is each point's own paired t-test of ΔNLL = 0 over windows, and "
       "`significant` is p < alpha: a per-point level, so a sweep of 30 points without any effect flags 1.5 by "
       "chance. `delta_nll_q` is the Benjamini–Hochberg q-value over the whole table: the points with q ≤ alpha "
       "hold at most a fraction alpha of false discoveries. Early-stopped points are untested (no p, no q)."),
    code("display(ranking(df, 'kld_mean' if has_kld else 'delta_ppl', 15))"),
    md("## Does the cheap proxy suffice?\n\n"
       "SQNR of the perturbed tensor costs nothing to compute; the end-to-end effect costs a perplexity run. "
       "A strong rank correlation (|ρ| near 1; negative, since more noise means more damage) says the proxy "
       "orders points correctly and the sweep could be pruned with it; a weak one says the position of a "
       "tensor in the network matters more than its own error."),
    code("fig, rho = proxy_scatter(df, 'kld_mean' if has_kld else 'delta_ppl')\nprint(f'Spearman rho = {rho:.3f}')"),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                               "language": "python"}})
nbf.write(nb, Path(__file__).with_name("sensitivity.ipynb"))
