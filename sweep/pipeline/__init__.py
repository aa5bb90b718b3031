"""The pipeline, in the order a sweep runs it: the configuration (config) composed by Hydra; the whole grid expanded
and validated before any job (grid); what it will cost in points, disk, memory and time (costs); one job per point,
stored or run (job); one point perturbed, scored and recorded (point), on a loaded model and its text (session,
reference); the generation check of the worst points after the sweep (gencheck)."""
