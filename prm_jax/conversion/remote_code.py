"""The Hugging Face remote-code files that make an exported PRM loadable by transformers.

transformers has no native `Qwen2ForProcessRewardModel`; an exported checkpoint therefore ships
our own configuration and modeling files (`prm_jax/conversion/hf_files/`) and names them in
`config.json`'s `auto_map`. This module is the single place that knows those file names, the
`auto_map` entries that point at them and the architecture string, so the exporter and the
tests cannot drift apart.

A Qwen3-based PRM ships its own pair of files (`Qwen3ForProcessRewardModel` on `Qwen3Model`, the
same head and names): Qwen3 exists only in transformers 4.51+, and a Qwen2 export must keep loading
on older versions, so the two families never share a file. `REMOTE_CODE[model_type]` holds each
family's files, `auto_map` and architecture; the module-level constants are Qwen2's.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from prm_jax.files import atomic_write
from prm_jax.models.config import UnsupportedCheckpointError

__all__ = [
    "ARCHITECTURE",
    "AUTO_MAP",
    "REMOTE_CODE",
    "REMOTE_CODE_FILES",
    "RemoteCode",
    "remote_code_for",
    "write_remote_code",
]

#: Files copied next to the weights; loaded by transformers with `trust_remote_code=True`.
REMOTE_CODE_FILES: Final[tuple[str, str]] = ("configuration_qwen2_prm.py", "modeling_qwen2_prm.py")

#: `config.json["auto_map"]`: which class in which shipped file each Auto class resolves to.
AUTO_MAP: Final[dict[str, str]] = {
    "AutoConfig": "configuration_qwen2_prm.Qwen2PRMConfig",
    "AutoModel": "modeling_qwen2_prm.Qwen2ForProcessRewardModel",
}

#: `config.json["architectures"][0]`; also the name vLLM dispatches on to serve the model natively.
ARCHITECTURE: Final[str] = "Qwen2ForProcessRewardModel"


@dataclasses.dataclass(frozen=True)
class RemoteCode:
    """One model family's PRM remote code: its files, `auto_map` and architecture string."""

    architecture: str
    files: tuple[str, ...]
    auto_map: Mapping[str, str]
    #: Whether vLLM (0.32) serves this architecture natively.
    vllm_native: bool


#: The PRM remote code of each model type an export can write.
REMOTE_CODE: Final[dict[str, RemoteCode]] = {
    "qwen2": RemoteCode(ARCHITECTURE, REMOTE_CODE_FILES, AUTO_MAP, vllm_native=True),
    "qwen3": RemoteCode(
        "Qwen3ForProcessRewardModel",
        ("configuration_qwen3_prm.py", "modeling_qwen3_prm.py"),
        {
            "AutoConfig": "configuration_qwen3_prm.Qwen3PRMConfig",
            "AutoModel": "modeling_qwen3_prm.Qwen3ForProcessRewardModel",
        },
        vllm_native=False,
    ),
}


def remote_code_for(model_type: str) -> RemoteCode:
    """The PRM remote code of a model type (`UnsupportedCheckpointError` if there is none)."""
    if model_type not in REMOTE_CODE:
        raise UnsupportedCheckpointError(
            f"no process-reward-model remote code for model_type={model_type!r} (have: {sorted(REMOTE_CODE)})"
        )
    return REMOTE_CODE[model_type]


# The files live in a data directory of the package (declared as package-data in pyproject.toml),
# so they are found the same way from a source tree, an editable install or a wheel.
_PACKAGE: Final[str] = "prm_jax.conversion"
_SUBDIR: Final[str] = "hf_files"


def write_remote_code(dst_dir: Path, model_type: str = "qwen2") -> None:
    """Copy the remote-code files of `model_type`'s PRM into `dst_dir` (created if missing).

    Each file is written to a temporary name and renamed, so an interrupted export never leaves a
    truncated Python file that transformers would later fail to import with a confusing error.
    """
    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    source_dir = importlib.resources.files(_PACKAGE).joinpath(_SUBDIR)
    for name in remote_code_for(model_type).files:
        atomic_write(dst_dir / name, source_dir.joinpath(name).read_bytes())
