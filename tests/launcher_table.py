"""Run one launcher's `main` in-process for many argument lists (one interpreter, not one each).

  python tests/launcher_table.py launch.convert CASES.json  ->  JSON list of {code, stderr, stdout}

Each case goes through the launchers' own front door (`launch.errors.parse_flags` and
`launch.errors.call`), so it behaves like `python -m launch.X ARGS` with a few ms per case
instead of seconds. Flags are reset between cases.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys
from pathlib import Path

from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_case(module, args: list[str]) -> dict:
    from launch import errors

    stderr, stdout = io.StringIO(), io.StringIO()
    code = 0
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:
        delattr(flags.FLAGS, name)  # override flags a previous case's config registered
    flags.FLAGS.unparse_flags()
    sys.argv = [module.__name__, *args]  # ml_collections' config flag reads its overrides from sys.argv
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(stdout):
        try:
            argv = errors.parse_flags([module.__name__, *args])
            errors.call(module.main, argv, getattr(module, "USER_ERRORS", ()))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except Exception as error:  # a bug: report it as such
            code, _ = 99, print(f"BUG {type(error).__name__}: {error}", file=sys.stderr)
    return {"code": code, "stderr": stderr.getvalue(), "stdout": stdout.getvalue()}


def main() -> None:
    module = importlib.import_module(sys.argv[1])
    cases = json.loads(Path(sys.argv[2]).read_text())
    print(json.dumps([run_case(module, args) for args in cases]))


if __name__ == "__main__":
    main()
