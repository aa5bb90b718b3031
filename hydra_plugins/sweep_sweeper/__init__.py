"""The sweep's Hydra sweeper (grid_sweeper.py); the sweep itself is the `sweep` package."""
