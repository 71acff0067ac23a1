"""The Hugging Face remote-code files that make an exported PRM loadable by transformers.

transformers has no native `Qwen2ForProcessRewardModel`; an exported checkpoint therefore ships
our own configuration and modeling files (`prm_jax/conversion/hf_files/`) and names them in
`config.json`'s `auto_map`. This module is the single place that knows those file names, the
`auto_map` entries that point at them and the architecture string, so the exporter and the
tests cannot drift apart.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Final

from prm_jax.files import atomic_write

__all__ = ["ARCHITECTURE", "AUTO_MAP", "REMOTE_CODE_FILES", "write_remote_code"]

#: Files copied next to the weights; loaded by transformers with `trust_remote_code=True`.
REMOTE_CODE_FILES: Final[tuple[str, str]] = ("configuration_qwen2_prm.py", "modeling_qwen2_prm.py")

#: `config.json["auto_map"]`: which class in which shipped file each Auto class resolves to.
AUTO_MAP: Final[dict[str, str]] = {
    "AutoConfig": "configuration_qwen2_prm.Qwen2PRMConfig",
    "AutoModel": "modeling_qwen2_prm.Qwen2ForProcessRewardModel",
}

#: `config.json["architectures"][0]`; also the name vLLM dispatches on to serve the model natively.
ARCHITECTURE: Final[str] = "Qwen2ForProcessRewardModel"

# The files live in a data directory of the package (declared as package-data in pyproject.toml),
# so they are found the same way from a source tree, an editable install or a wheel.
_PACKAGE: Final[str] = "prm_jax.conversion"
_SUBDIR: Final[str] = "hf_files"


def write_remote_code(dst_dir: Path) -> None:
    """Copy the remote-code files into `dst_dir` (created if missing).

    Each file is written to a temporary name and renamed, so an interrupted export never leaves a
    truncated Python file that transformers would later fail to import with a confusing error.
    """
    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    source_dir = importlib.resources.files(_PACKAGE).joinpath(_SUBDIR)
    for name in REMOTE_CODE_FILES:
        atomic_write(dst_dir / name, source_dir.joinpath(name).read_bytes())
