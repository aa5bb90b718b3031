"""Cluster launches: SLURM through submitit that waits for every task and loses nothing (launcher), the points a
sweep could not finish and the command that finishes them (incomplete), a task's time limit from the plan
(time_limit)."""
