"""Options shared by many verbs, defined once: every request dataclass inherits the groups it takes, the CLI builds
its typer options from the same names, and a recipe step accepts the same keys."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class ModelOptions:
    """Which model, and how to load it: a zoo name, HF directory, .gguf or weights file (`arch` gives a bare
    weights file its config; `trust_pickle` lets a pickled checkpoint run code)."""

    model: str
    arch: str | None = None
    trust_pickle: bool = False

    def loader(self) -> Callable[[str], Any]:
        """A function spec -> LoadedModel with this request's arch and trust flags."""
        from compress.models import load_model

        return lambda spec: load_model(spec, arch=self.arch, trust_pickle=self.trust_pickle)

    def load_source(self) -> tuple[Any, bool]:
        """(LoadedModel, True) for a compress artifact directory, (LoadedModel, False) for any other model spec."""
        from compress.artifact import is_artifact
        from compress.artifact_formats import load_artifact

        path = Path(self.model).expanduser()
        if is_artifact(path):
            return load_artifact(path), True
        return self.loader()(self.model), False


@dataclass
class DataOptions:
    """Which text, and how much of it: `data` is a file, directory, glob or 'self' (sampled from the model);
    `tokens` whole windows of `seq_len` (None: 512 decoders, 256 encoders); `seed` fixes split and sampling."""

    data: str | None = None
    tokens: int = 2048
    seq_len: int | None = None
    seed: int = 0

    def check_data(self, flag: str = "--data") -> None:
        """UserError when `data` names text that is not there (before any model is loaded)."""
        from compress.inputs import check_data

        check_data(self.data, flag)


@dataclass
class OutputOptions:
    """Where the result goes (`out`, None: not saved)."""

    out: Path | None = None


@dataclass
class StreamOptions:
    """Whether the model is worked on block by block from disk (`stream`: auto | on | off), and where hidden states
    too large for memory go meanwhile (`offload_dir`; None: the system's temporary directory)."""

    stream: str = "auto"
    offload_dir: Path | None = None
    device: str = "auto"

    def check_stream(self) -> None:
        """UserError for a --stream or --device value that is not one of the choices, or an --offload-dir that is
        no directory."""
        from compress.errors import UserError
        from compress.stream.decide import DEVICE, STREAM

        STREAM.check(self.stream)
        DEVICE.check(self.device)
        if self.offload_dir is not None and not Path(self.offload_dir).expanduser().is_dir():
            raise UserError(f"--offload-dir {self.offload_dir}: not a directory; create it or name an existing one")

    def compute_device(self, streamed: bool) -> Any:
        """The torch.device the run computes on (compress.stream.decide.resolve_device)."""
        from compress.stream.decide import resolve_device

        return resolve_device(self.device, streamed)

    def stream_choice(self, spec: str) -> Any:
        """compress.stream.decide's StreamChoice for `spec` under this request's --stream."""
        from compress.stream.decide import decide

        return decide(spec, self.stream)
