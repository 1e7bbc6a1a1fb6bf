"""Plan: the recipe, an ordered mapping from module name, `re:` regex or `_default` to an action.

Read like torchao's FqnToConfig or llama-quantize's --tensor-type: exact names win, then regexes in order, then
`_default`. An action is a QuantSpec as a dict ({"bits": 4, "group_size": 32, "symmetric": true, "method": "rtn"});
{"bits": 32} keeps a module in float. A module no rule matches (and no `_default`) is left as it is.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.errors import UserError
from compress.quantize.spec import QuantSpec

ACTION_KEYS = {"bits", "group_size", "symmetric", "method", "positive_scale", "kquant"}


@dataclass
class Plan:
    """Per-module quantization actions plus how they were chosen (budget, allocator, provenance)."""

    rules: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        for key, action in self.rules.items():
            _spec(key, action)
            if key.startswith("re:"):
                try:
                    re.compile(key[3:])
                except re.error as exc:
                    raise UserError(f"plan rule '{key}': bad regex ({exc})") from exc

    def spec_for(self, name: str) -> QuantSpec | None:
        """The action for one module name, or None when no rule applies."""
        if name in self.rules:
            return _spec(name, self.rules[name])
        for key, action in self.rules.items():
            if key.startswith("re:") and re.fullmatch(key[3:], name):
                return _spec(key, action)
        if "_default" in self.rules:
            return _spec("_default", self.rules["_default"])
        return None

    def resolve(self, names: list[str]) -> dict[str, QuantSpec]:
        """Specs for every name a rule applies to; UserError for rules naming nothing that exists."""
        known = set(names)
        for key in self.rules:
            if key == "_default":
                continue
            if key.startswith("re:"):
                if not any(re.fullmatch(key[3:], n) for n in names):
                    raise UserError(f"plan rule '{key}' matches no quantizable module; see `compress inspect`")
            elif key not in known:
                raise UserError(f"plan names module '{key}', which is not a quantizable module of this model; "
                                "see `compress inspect`")
        out = {}
        for n in names:
            spec = self.spec_for(n)
            if spec is not None:
                out[n] = spec
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON form: {"rules": {...}, "meta": {...}}."""
        return {"rules": self.rules, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: Any, source: str = "plan") -> Plan:
        """Validate and build; UserError naming the problem otherwise. Also reads the `plan` inside the JSON that
        `compress quantize --show-plan --json` prints, or inside an artifact's compress.json."""
        if isinstance(d, dict) and "rules" not in d and isinstance(d.get("plan"), dict):
            d = d["plan"]
        if not isinstance(d, dict) or not isinstance(d.get("rules"), dict):
            raise UserError(f"{source}: not a plan; expected {{\"rules\": {{name | \"re:regex\" | \"_default\": "
                            "{\"bits\": 4, \"group_size\": 32}}}}")
        return cls(dict(d["rules"]), dict(d.get("meta") or {}))

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        """Read a plan JSON file."""
        p = Path(path)
        if not p.is_file():
            raise UserError(f"--plan {path}: no such file")
        try:
            d = json.loads(p.read_text())
        except ValueError as exc:
            raise UserError(f"--plan {path}: not valid JSON ({exc})") from exc
        return cls.from_dict(d, f"--plan {path}")

    @classmethod
    def uniform(cls, spec: QuantSpec, names: list[str], **meta: Any) -> Plan:
        """One action for every listed module."""
        return cls({n: spec.to_dict() for n in names}, dict(meta))


def _spec(key: str, action: Any) -> QuantSpec:
    if not isinstance(action, dict) or "bits" not in action:
        raise UserError(f"plan rule '{key}': an action is an object with at least \"bits\", got {action!r}")
    unknown = set(action) - ACTION_KEYS
    if unknown:
        raise UserError(f"plan rule '{key}': unknown keys {sorted(unknown)}; allowed are {sorted(ACTION_KEYS)}")
    try:
        return QuantSpec(**action)
    except TypeError as exc:
        raise UserError(f"plan rule '{key}': {exc}") from exc
