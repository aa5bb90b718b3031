"""`hydra/launcher=slurm` (conf/hydra/launcher/slurm.yaml): the logic is in sweep/cluster/launcher.py."""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher


class SlurmLauncher(SubmititSlurmLauncher):
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from sweep.cluster.launcher import launch  # deferred: Hydra imports every plugin module at each start

        return launch(self, job_overrides, initial_job_idx)
