"""`hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml): the logic is in sweep/cluster/launcher.py."""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher


class SlurmLauncher(SubmititSlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher (its executor `_EXECUTOR = "slurm"` is its kind:
    sweep.choices.launcher_kind), waiting for every task and running the generation check as a task of its own."""

    RUNS_GENERATION_CHECK = True  # metrics.generate=top:N: the end-of-sweep callback then only gathers

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from sweep.cluster.launcher import launch  # deferred: Hydra imports every plugin module at each start

        return launch(self, job_overrides, initial_job_idx)
