"""Outputs never land on inputs: the one check every writer runs before writing a byte.

A conversion whose destination is its source (or a folder inside or around it) would delete the
source on `--overwrite`; an evaluation whose output folder holds its data would write over or
pollute that data. `refuse_output_over_input` refuses all of these, on resolved paths
(symlinks and `..` included), before any work starts.

`--overwrite` replaces only what the writing tool itself wrote: `replace_problem` lets a
destination be replaced when it is absent, empty, or recognised by the writer's own markers
(`OwnOutput`: a prm-jax HF export's config.json, an imported Orbax checkpoint's metadata); a
training workdir or an unrelated folder is refused in one line naming what it holds. Tools that
write named files into a folder (evaluation) replace only those files and leave the rest.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = [
    "OutputNotOwnedError",
    "OutputOverInputError",
    "OwnOutput",
    "describe_directory",
    "overlapping_inputs",
    "refuse_output_over_input",
    "refuse_unreplaceable",
    "replace_problem",
]

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


# ---------------------------------------------------------------------------- what --overwrite may replace


class OutputNotOwnedError(FileExistsError):
    """A destination exists and is not (recognisably) what the writing tool itself wrote."""


@dataclasses.dataclass(frozen=True)
class OwnOutput:
    """What one writer writes, and how to recognise it: `kind` names it in messages ("a prm-jax
    Hugging Face export"), `recognise(directory)` says whether a directory carries its markers
    (it must not raise for any directory, nor block or read without bound)."""

    kind: str
    recognise: Callable[[Path], bool]


#: What other prm-jax writers leave, by the names they write: read to say what a refused
#: destination holds (never to allow replacing it).
_KNOWN_LAYOUTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("a training workdir", ("checkpoints", "metrics.jsonl")),
    ("a training workdir", ("checkpoints", "config.json")),
    ("a synthesis workdir", ("run_config.json",)),
    ("an evaluation output folder", ("results.json",)),
    ("a training checkpoint step", ("params", "opt_state")),
    ("an Orbax model checkpoint", ("params", "model_config")),
    ("a Hugging Face model", ("config.json", "model.safetensors")),
    ("a Hugging Face model", ("config.json", "model.safetensors.index.json")),
)


def describe_directory(directory: Path, *, shown: int = 5) -> str:
    """What a directory holds, in a few words: a known layout (with its telling names) or its entries."""
    try:
        names = sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir())
    except OSError as error:
        return f"an unreadable directory ({error.strerror})"
    plain = {name.rstrip("/") for name in names}
    listing = ", ".join(names[:shown]) + (f", ... ({len(names)} entries)" if len(names) > shown else "")
    for kind, markers in _KNOWN_LAYOUTS:
        if set(markers) <= plain:
            return f"{kind} ({listing})"
    return f"a folder holding {listing}"


def replace_problem(target: PathLike, *, name: str, own: OwnOutput, overwrite: bool) -> str | None:
    """Why the tool writing `own` may not put its output at `target` (None: it may).

    Allowed: nothing there, an empty directory, or (with `overwrite`) a directory `own`
    recognises. Refused: a file, a non-empty directory without `overwrite`, and with `overwrite`
    anything `own` does not recognise (a training workdir, a downloaded model, unrelated files),
    since replacing deletes it. `name` is the flag or argument naming the destination.
    """
    target = Path(target)
    if not os.path.lexists(target):
        return None
    if not target.is_dir():
        return f"{name}={target} exists and is not a directory; choose a directory path for {own.kind}"
    try:
        if not any(target.iterdir()):
            return None
    except OSError as error:
        return f"{name}={target} cannot be listed ({error.strerror}); choose another {name}"
    if not overwrite:
        return (
            f"{name}={target} exists and is not empty ({describe_directory(target)}); "
            f"pass --overwrite to replace it (only if it is {own.kind}) or choose another {name}"
        )
    if own.recognise(target):
        return None
    return (
        f"{name}={target} is {describe_directory(target)}, not {own.kind}: --overwrite replaces only "
        f"{own.kind} (here it would delete all of this); choose another {name}, or remove it yourself"
    )


def refuse_unreplaceable(target: PathLike, *, name: str, own: OwnOutput, overwrite: bool) -> None:
    """`OutputNotOwnedError` with `replace_problem`'s line when `target` may not be written."""
    problem = replace_problem(target, name=name, own=own, overwrite=overwrite)
    if problem:
        raise OutputNotOwnedError(problem)
