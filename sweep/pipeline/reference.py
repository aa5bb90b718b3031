"""The reference a point is measured against: the model in its container, and the text cut into windows.

`open_reference(settings)` takes the settings' `model`, `data` and `run` parts (sweep/pipeline/settings.py). The
loaded model belongs to a `session.Session`: the reference's own, closed with it, or -- in a sweep process -- one of
the `Sessions` that the jobs share.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..llama.backend import Backend
from ..llama.container import container_path
from ..llama.model_file import ModelInfo, model_info, sha256
from ..scoring.text import Text, load_text
from ..scoring.windows import Windows, make_windows
from .session import Session, Sessions
from .settings import ScoreSettings, settled


@dataclass
class Inputs:
    """What a point depends on, cheap to get: the model file (hashed, described) and the text."""

    source: Path  # the user's model file (never written)
    info: ModelInfo
    text: Text

    @property
    def model_sha256(self) -> str:
        return sha256(self.source)


@dataclass
class Reference(Inputs):
    """The inputs made ready: the model loaded in its container (by `session`), the text cut into windows."""

    container: str  # "f32" | "native"
    session: Session
    windows: Windows
    owns_session: bool = False  # True: closing the reference closes its model
    native_weights: str = "delta"  # model.native_weights: how a native weight point perturbs a quantized tensor

    @property
    def backend(self) -> Backend:
        return self.session.backend

    @property
    def threads(self) -> int:
        return self.backend.n_threads

    def close(self) -> None:
        if self.owns_session:
            self.session.close()

    def __enter__(self) -> Reference:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_inputs(s: ScoreSettings) -> Inputs:
    source = s.model.source
    info = model_info(source)
    return Inputs(source, info, load_text(s.data.path))


def open_reference(s: ScoreSettings, inputs: Inputs | None = None, sessions: Sessions | None = None) -> Reference:
    """The reference of the settings `s`; its model from `sessions` when given (shared, closed by its owner), else
    loaded for this reference alone (closed with it)."""
    inputs = inputs or load_inputs(s)  # the text first: a missing text fails fast
    s = settled(s)  # model.container=auto outside a sweep (which settles it before its jobs: grid.py)
    file = container_path(inputs.source, s.model.container, s.model.cache_dir)
    threads, n_ctx = s.run.n_threads, s.data.n_ctx
    settings = s.model.compute
    session = sessions.get(file, n_ctx, threads, settings) if sessions else Session(file, n_ctx, threads, settings)
    try:
        b = session.backend
        windows = make_windows(session.tokens(inputs.text), n_ctx, s.data.n_windows, b.bos if b.add_bos else None)
    except BaseException:
        if sessions is None:
            session.close()
        raise
    return Reference(inputs.source, inputs.info, inputs.text, s.model.container, session, windows,
                     owns_session=sessions is None, native_weights=s.model.native_weights)
