"""Config validation that reports every problem at once, each naming its field and the fix.

A `ConfigChecker` reads fields of an `ml_collections.ConfigDict` by dotted name and collects one
line per problem, `--config.FIELD=VALUE: requirement`, so a launcher can print them all before
anything is read or written. Training, synthesis and the embedded demo validate with it; each
adds its cross-field rules as plain lines in `problems`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import ml_collections

#: A Hugging Face tokenizer directory has at least one of these (save_pretrained writes the first).
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "tokenizer.model")


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


#: What `ConfigChecker.get` returns for a field the config does not have.
MISSING = _Missing()


def _show(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)


class ConfigChecker:
    """Collects problems; each check reads one field and names it in its message."""

    def __init__(self, config: ml_collections.ConfigDict) -> None:
        self.config = config
        self.problems: list[str] = []

    def get(self, dotted: str) -> Any:
        node: Any = self.config
        for name in dotted.split("."):
            if name not in node:
                return MISSING
            node = node[name]
        return node

    def add(self, dotted: str, value: Any, requirement: str) -> None:
        self.problems.append(f"--config.{dotted}={_show(value)}: {requirement}")

    def integer(self, dotted: str, minimum: int | None = None) -> int | None:
        value = self.get(dotted)
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(dotted, value, "must be an integer" + (f" >= {minimum}" if minimum is not None else ""))
            return None
        if minimum is not None and value < minimum:
            self.add(dotted, value, f"must be >= {minimum}")
            return None
        return value

    def number(
        self,
        dotted: str,
        low: float | None = None,
        high: float | None = None,
        *,
        low_open: bool = False,
        high_open: bool = False,
    ) -> float | None:
        value = self.get(dotted)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.add(dotted, value, "must be a finite number")
            return None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high:
            lo = "" if low is None else f"{'(' if low_open else '['}{low}"
            hi = "" if high is None else f"{high}{')' if high_open else ']'}"
            self.add(dotted, value, f"must be in {lo or '(-inf'}, {hi or 'inf)'}")
            return None
        return float(value)

    def choice(self, dotted: str, choices: tuple[str, ...]) -> str | None:
        value = self.get(dotted)
        if value not in choices:
            # Quoted: a wrong name shows as 'vlm', an empty one as ''.
            self.add(dotted, repr(value), f"choose one of {', '.join(repr(c) for c in choices)}")
            return None
        return value

    def boolean(self, dotted: str) -> None:
        value = self.get(dotted)
        if not isinstance(value, bool):
            self.add(dotted, value, "must be true or false")

    def path(self, dotted: str, kind: str, *, required: bool, hint: str = "") -> None:
        """`kind`: "file" (non-empty), "dir", or "tokenizer" (a Hugging Face tokenizer directory)."""
        value = self.get(dotted)
        if value in ("", None, MISSING):
            if required:
                self.add(dotted, "", f"is required{': ' + hint if hint else ''}")
            return
        if not isinstance(value, str):
            self.add(dotted, value, "must be a path string")
            return
        path = Path(value)
        if kind == "file":
            if not path.exists():
                self.add(dotted, value, "no such file")
            elif not path.is_file():
                self.add(dotted, value, "is not a file")
            elif path.stat().st_size == 0:
                self.add(dotted, value, "the file is empty: it holds no training records")
        elif not path.is_dir():
            self.add(dotted, value, "no such directory" if not path.exists() else "is not a directory")
        elif kind == "tokenizer" and not any((path / name).is_file() for name in TOKENIZER_FILES):
            self.add(dotted, value, f"holds no Hugging Face tokenizer (none of {', '.join(TOKENIZER_FILES)})")
