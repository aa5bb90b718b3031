"""Writes sensitivity.ipynb (no outputs). The notebook's logic lives in sweep/report/plots.py; edit that, not cells."""

from pathlib import Path

import nbformat as nbf

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
    md("# Precision sensitivity of a GGUF model\n\n"
       "Reads the results table of a sweep: the path in `SWEEP_RESULTS` (a sweep directory or a "
       "`results.parquet`/`.csv`), or else the newest sweep under `runs/`. Every figure comes from "
       "`sweep.report.plots`, the same module behind `python -m sweep.report DIR --plots OUT`."),
    code("import os\n\nfrom IPython.display import display\n\n"
         "from sweep.report.plots import heatmaps, load_results, proxy_scatter, sensitivity_curves\n"
         "from sweep.report.ranking import ranking\n\n"
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
    md("## Do the damages add up? Joint points\n\n"
       "A joint point (`fmt=recipe fmt.recipe=DIR/recipe.json`, docs/recipes.md) perturbs many "
       "tensors at once, each at the type a recipe gives it, and its record carries the recipe's prediction: the "
       "sum of those tensors' single-tensor damages. On the dashed line the damages add up; the error bar is the "
       "paired 95% interval of the residual (measured − predicted, window by window on the tables' windows)."),
    code("from sweep.report.plots import additivity\n\n"
         "fig = additivity(df)\n"
         "if fig is None:\n"
         "    print('no joint points in this table: python -m sweep tensor=all layer=null fmt=recipe "
         "fmt.recipe=DIR/recipe.json')\n"
         "else:\n"
         "    cols = ['tensor', 'layers', 'kld_mean', 'predicted', 'additivity_residual', 'additivity_residual_lo',\n"
         "            'additivity_residual_hi', 'not_predicted']\n"
         "    display(df[df['predicted'].notna()][[c for c in cols if c in df]])"),
    md("## The recipe against llama.cpp's mixes\n\n"
       "`python -m sweep.recipe ... --build OUT.gguf --validate` scores the built recipe and llama.cpp's presets on "
       "held-out windows (text after the tables' slice) and writes `validation.json`. Set `SWEEP_RECIPE` to it (or "
       "its directory); else the newest under `runs/` is shown. Left: file size against held-out KL divergence "
       "(95% intervals), the Pareto view; right: each file's predicted damage against the damage measured on the "
       "sweep's windows."),
    code("from sweep.report.plots import load_validation, recipe_pareto\n"
         "from sweep.recipe.validate import format_report\n\n"
         "report = load_validation(os.environ.get('SWEEP_RECIPE'))\n"
         "if report is None:\n"
         "    print('no validation.json: run python -m sweep.recipe RUNS --size Q4_K_M --build OUT.gguf --validate')\n"
         "else:\n"
         "    print(format_report(report))\n"
         "    fig = recipe_pareto(report)"),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                               "language": "python"}})
nbf.write(nb, Path(__file__).with_name("sensitivity.ipynb"))
