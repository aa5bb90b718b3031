"""The sensitivity map: every weight point of a grid predicted from its weight error and a few exact points
(run.estimate=map, docs/estimate.md)."""
