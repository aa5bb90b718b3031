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
