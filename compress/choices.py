"""A named set of options with one line each: the single source for a flag's accepted values, its --help text, its
error message and the recipe's validation (llama.cpp's QUANT_OPTIONS table, in small)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from compress.errors import UserError


@dataclass(frozen=True)
class Choices:
    """`flag`'s accepted values, each with what it does."""

    flag: str
    options: dict[str, str]

    def check(self, value: str | None, allow_none: bool = False) -> str | None:
        """`value` when accepted; UserError naming the flag and every accepted value otherwise."""
        if value is None and allow_none:
            return None
        if value not in self.options:
            accepted = " or ".join(self) if len(self) == 2 else ", ".join(self)
            raise UserError(f"{self.flag} {value}: use {accepted}")
        return value

    def help(self, lead: str = "") -> str:
        """'a (what a does) | b (what b does)' for typer's help, after an optional lead sentence."""
        body = " | ".join(f"{k} ({v})" for k, v in self.options.items())
        return f"{lead} {body}." if lead else f"{body}."

    def __iter__(self) -> Iterator[str]:
        return iter(self.options)

    def __contains__(self, value: object) -> bool:
        return value in self.options

    def __len__(self) -> int:
        return len(self.options)
