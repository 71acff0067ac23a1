"""Run in a virtual environment that has only `pip install -e .` (no extras): every run-time import of
the library and the launchers must resolve there, so the test extra cannot hide a missing dependency.

Checks three things and exits non-zero naming every failure:
1. every third-party module that `prm_jax`, `data_pipeline`, `launch` or `configs` import anywhere
   (top level or inside a function: lazy imports are run-time imports too) can be found, except the
   ones that belong to an optional extra (OPTIONAL below);
2. imports flow one way, launch -> data_pipeline -> prm_jax (LAYERS below), lazy ones included;
3. every module of those packages imports.
Indirect needs (transformers' chat templates need jinja2) are caught by the main job's smoke run that
`.ci/run` does in the same environment.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("prm_jax", "data_pipeline", "launch", "configs")
FIRST_PARTY = set(PACKAGES) | {"bench"}
# Third-party modules that only an optional extra brings, and where they are used.
OPTIONAL = {
    "vllm": "the vllm extra (prm_jax.generation.vllm_backend imports it lazily)",
    "openai": "the openai extra (prm_jax.generation.openai_backend imports it lazily)",
    "ray": "the ray extra (data_pipeline.ray_runner imports it lazily, for launch.synthesize --runner=ray)",
    "torch": "the HF remote code run by transformers, and the torch side of the benchmarks",
}
# First-party packages each package must not import: the library never reaches up to synthesis or
# to the application layer (the demo, the launchers).
LAYERS = {"prm_jax": {"data_pipeline", "launch", "configs"}, "data_pipeline": {"launch", "configs"}}
# Files that are not part of the installed library's import graph: the remote code shipped beside
# exported weights, which transformers (with torch) imports.
NOT_IMPORTED = set((ROOT / "prm_jax" / "conversion" / "hf_files").glob("modeling_*.py"))


def _imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _sources() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def _import_problem(path: Path) -> str | None:
    """Imports one source file the way it is used: library modules in this process; launchers (each
    defines its own absl flags) in a fresh interpreter started from the checkout, as `python -m`
    runs them; config files by path, as `--config=configs/x.py` loads them."""
    relative = path.relative_to(ROOT)
    module = ".".join(relative.with_suffix("").parts).removesuffix(".__init__")
    try:
        if relative.parts[0] == "configs":
            spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        elif relative.parts[0] == "launch":
            result = subprocess.run(
                [sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True, check=False
            )
            if result.returncode:
                return f"import {module}: {result.stderr.strip().splitlines()[-1]}"
        else:
            importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, not only the first
        return f"import {module}: {type(exc).__name__}: {exc}"
    return None


def main() -> int:
    problems = []
    third_party: dict[str, list[str]] = {}
    for path in _sources():
        imported, relative = _imported_names(path), path.relative_to(ROOT)
        for name in imported - FIRST_PARTY - set(sys.stdlib_module_names):
            third_party.setdefault(name, []).append(str(relative))
        for name in sorted(imported & LAYERS.get(relative.parts[0], set())):
            problems.append(f"{relative} imports {name}: imports flow launch -> data_pipeline -> prm_jax")
    for name, users in sorted(third_party.items()):
        if name in OPTIONAL:
            continue
        if importlib.util.find_spec(name) is None:
            problems.append(
                f"module {name!r} (imported by {', '.join(users[:3])}) is not installed by "
                f"`pip install -e .`: add its distribution to [project.dependencies]"
            )
    for path in _sources():
        if path in NOT_IMPORTED:
            continue
        problem = _import_problem(path)
        if problem:
            problems.append(problem)
    if problems:
        print(f"{len(problems)} run-time import problem(s) without the test extra:", *problems, sep="\n  ")
        return 1
    print(
        f"run-time imports: {len(third_party)} third-party modules resolved "
        f"({', '.join(sorted(set(third_party) - set(OPTIONAL)))}); optional: {', '.join(sorted(OPTIONAL))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
