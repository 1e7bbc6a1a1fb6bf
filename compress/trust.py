"""What foreign code a run may execute: a model directory's own Python (transformers' remote code) only when the
user said so with `--trust-remote-code`; pickles are governed per load by `--trust-pickle`."""

from __future__ import annotations

_REMOTE_CODE = False


def allow_remote_code(on: bool) -> None:
    """Let (or stop) model directories whose config.json names code of their own (auto_map) load in this process."""
    global _REMOTE_CODE
    _REMOTE_CODE = bool(on)


def remote_code_allowed() -> bool:
    """True once `--trust-remote-code` was given."""
    return _REMOTE_CODE
