"""Outputs never land on inputs: the one check every writer runs before writing a byte.

A conversion whose destination is its source (or a folder inside or around it) would delete the
source on `--overwrite`; an evaluation whose output folder holds its data would write over or
pollute that data. `refuse_output_over_input` refuses all of these, on resolved paths
(symlinks and `..` included), before any work starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["OutputOverInputError", "overlapping_inputs", "refuse_output_over_input"]

PathLike = str | os.PathLike[str]


class OutputOverInputError(ValueError):
    """An output path equals, contains or lies inside an input path."""


def _resolved(path: PathLike) -> Path:
    return Path(path).expanduser().resolve(strict=False)


def _relation(output: Path, source: Path) -> str | None:
    if output == source:
        return "is"
    if source.is_relative_to(output):
        return "contains"
    if output.is_relative_to(source):
        return "is inside"
    return None


def overlapping_inputs(inputs: Mapping[str, PathLike | None], output: PathLike, output_name: str) -> list[str]:
    """One problem line per input that `output` equals, contains or lies inside (empty: none)."""
    out = _resolved(output)
    problems = []
    for name, value in inputs.items():
        if not value:
            continue
        relation = _relation(out, _resolved(value))
        if relation is not None:
            problems.append(f"{output_name} {output} {relation} the input {name} {value}")
    return problems


def refuse_output_over_input(inputs: Mapping[str, PathLike | None], output: PathLike, output_name: str) -> None:
    """Raise `OutputOverInputError` when `output` would write over or into an input.

    `inputs` maps a name for the message (a flag or argument name) to a path; empty values are
    skipped. Nothing is read or written.
    """
    problems = overlapping_inputs(inputs, output, output_name)
    if problems:
        raise OutputOverInputError(
            "; ".join(problems) + f": writing there could destroy the input; choose a separate {output_name}"
        )
