"""Studies: the measurements behind a finding in the docs (early stopping, the source grid, the recipe ladder)."""
