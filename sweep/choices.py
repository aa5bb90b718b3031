"""The fixed sets of values that the configuration (sweep/pipeline/config.py) and the packages below it share: an
Enum each, so that the Hydra config rejects other values at composition."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A value from a fixed set: equal to, printed and hashed as its plain string."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Container(Choice):
    auto = "auto"  # f32 where it fits with room in memory and on disk, else native (sweep/llama/capacity.py)
    f32 = "f32"  # every tensor dequantized to F32 once (cached): the reference for sensitivity
    native = "native"  # the file as it is: quantized kernels (requantized activations: a noise floor)


class NativeWeights(Choice):
    """How a weight point perturbs a quantized tensor of the native container (sweep/llama/weight_delta.py)."""

    delta = "delta"  # the file's own kernel on W, plus (fmt(W) - W)·x in F32: no copy, the sweep's one baseline
    copy = "copy"  # a copy of the file with the target in F32 per point, against that copy's own baseline


class Kind(Choice):
    weight = "weight"
    activation = "activation"


class Estimate(Choice):
    """run.estimate: how the grid's points are scored (docs/estimate.md)."""

    off = "off"  # every point measured exactly
    map = "map"  # weight points of GGUF types predicted from a few exact points per tensor (sweep/estimate/)


class LauncherKind(Choice):
    """Who runs a sweep's jobs (`launcher_kind`)."""

    basic = "basic"  # Hydra's BasicLauncher (or no launcher): one job after another, in the sweep's own process
    joblib = "joblib"  # hydra/launcher=parallel (hydra-joblib-launcher): processes on this machine
    slurm = "slurm"  # hydra/launcher=slurm: SLURM array tasks through submitit (hydra_plugins/sweep_launchers)
    submitit_local = "submitit_local"  # hydra/launcher=submitit_local: submitit's processes on this machine
    other = "other"  # any other launcher: the jobs run elsewhere, nothing else known


# The launchers by their class's name, the last part of `_target_`: Hydra's, hydra-joblib-launcher's, and
# hydra-submitit-launcher's two, whose executor (`_EXECUTOR`: "slurm", "local") each names a kind. Ours subclasses
# submitit's SlurmLauncher under the same name and executor.
_KIND_OF_CLASS = {"BasicLauncher": LauncherKind.basic, "JoblibLauncher": LauncherKind.joblib,
                  "SlurmLauncher": LauncherKind.slurm, "LocalLauncher": LauncherKind.submitit_local}


def launcher_kind(launcher_cfg) -> LauncherKind:
    """The kind of the launcher `hydra.launcher` configures (None, or one without `_target_`: the basic one)."""
    target = str((launcher_cfg or {}).get("_target_") or "")
    if not target:
        return LauncherKind.basic
    return _KIND_OF_CLASS.get(target.rpartition(".")[2], LauncherKind.other)
