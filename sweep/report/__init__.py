"""What a finished sweep shows: the ranking (ranking), the figures (plots), the end-of-sweep Hydra callback
(callbacks); `python -m sweep.report` rebuilds the table and the ranking from sweep directories."""
