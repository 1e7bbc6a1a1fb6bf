"""What one reparameterization pass did: the Record every pass returns, and the session that fills it in."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from compress.errors import UserError


@dataclass
class Record:
    """One pass over one model: what was folded (module names), the equivalence check, notes and time."""

    pass_name: str
    changes: list[str] = field(default_factory=list)
    equivalence: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # Structural edits (module swaps, new biases) needed to rebuild the model's skeleton when it is loaded again.
    edits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def count(self) -> int:
        """How many folds/merges the pass made."""
        return len(self.changes)

    @property
    def passed(self) -> bool:
        """True when the outputs after the pass match the outputs before (or nothing changed)."""
        return bool(self.equivalence is None or self.equivalence.get("pass", False))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {pass, changes, count, equivalence, notes, seconds, edits}."""
        return {"pass": self.pass_name, "changes": list(self.changes), "count": self.count,
                "equivalence": self.equivalence, "notes": list(self.notes), "seconds": round(self.seconds, 3),
                "edits": list(self.edits)}


class PassSession:
    """Runs the reference forward before a pass changes anything and the equivalence check after it.

    The model is switched to eval first (BatchNorm must use running statistics, dropout must be off); when it was
    training, that is noted, never an error. Sample inputs are only built (or guessed) when the pass has something
    to change, so a model with nothing to fold never needs them.
    """

    def __init__(self, name: str, model: nn.Module, sample_inputs: Any = None):
        self.t0 = time.perf_counter()
        self.model = model
        self.record = Record(name)
        self._inputs = sample_inputs
        self.reference: list | None = None
        self.input_ndims: dict[int, int] = {}
        training = [n for n, m in model.named_modules() if m.training and _is_bn(m)]
        if model.training or training:
            what = (f"{len(training)} BatchNorm module(s) in training mode ({_few(training)})" if training
                    else "the model was in training mode")
            self.record.notes.append(f"{what}: switched the model to eval, so BatchNorm uses its running statistics "
                                     "and dropout is off")
            model.eval()

    @property
    def inputs(self) -> Any:
        """The sample inputs: given, or guessed from the model (UserError when they cannot be guessed)."""
        if self._inputs is None:
            from compress.reparam.check import default_inputs

            self._inputs = default_inputs(self.model)
        return self._inputs

    def run_reference(self, watch: list[nn.Module] = ()) -> None:
        """Forward the sample inputs once before any change; record the input ndim of the `watch` modules."""
        from compress.reparam.check import outputs

        handles = [m.register_forward_pre_hook(self._ndim_hook(id(m))) for m in watch]
        try:
            self.reference = outputs(self.model, self.inputs)
        finally:
            for h in handles:
                h.remove()

    def _ndim_hook(self, key: int):
        def hook(_module, args):
            if args and hasattr(args[0], "ndim"):
                self.input_ndims.setdefault(key, args[0].ndim)
        return hook

    def finish(self, tol: float | None = None) -> Record:
        """Check the model against the reference outputs (when anything changed) and close the record."""
        from compress.reparam.check import RTOL, compare, outputs

        if self.record.changes:
            if self.reference is None:
                raise RuntimeError("pass changed the model without a reference forward")
            self.record.equivalence = compare(self.reference, outputs(self.model, self.inputs), tol or RTOL)
        else:
            self.record.equivalence = {"checked": False, "pass": True, "reason": "nothing changed"}
        self.record.seconds = time.perf_counter() - self.t0
        return self.record


def _is_bn(m: nn.Module) -> bool:
    from torch.nn.modules.batchnorm import _BatchNorm

    return isinstance(m, _BatchNorm)


def _few(names: list[str], k: int = 3) -> str:
    return ", ".join(names[:k]) + (f", ... ({len(names)} in all)" if len(names) > k else "")


def refuse(msg: str) -> UserError:
    """A one-line UserError (newlines folded)."""
    return UserError(" ".join(msg.split()))
