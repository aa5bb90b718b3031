"""Hydra finds launchers only in the `hydra_plugins` namespace: sweep's own live here, their logic in `sweep`."""
