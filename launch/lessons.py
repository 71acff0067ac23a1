r"""The paper's lessons, measured in the embedded world: one command, one report.

  python -m launch.lessons --workdir=/tmp/lessons          # or: prm-jax-lessons --workdir=...
  python -m launch.lessons --workdir=/tmp/lessons --config.scale=small      # every arm, tiny sizes
  python -m launch.lessons --workdir=/tmp/lessons --report=docs/lessons_reproduced.md

One policy and one synthesis shared by every arm; a PRM per labeller (MC hard at k=4 and 8 and other
thresholds, MC soft, the judge at several error rates, consensus, the exact checker, size-matched and
smaller training sets), each trained at `lessons.seeds` seeds with the same budget and evaluated on
the same held-out responses (`launch.lessons_pipeline`). Output: W/lessons.json (`arms`, `findings`,
`label_quality`), the report (W/lessons_reproduced.md unless --report says where) with its PNGs, and
every arm's artifacts under W. Rerunning the same command resumes; the same seed gives the same
lessons.json, and a resume with other settings is refused. The default scale takes 16 minutes on 2 CPU
cores, `--config.scale=small` under 2.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

from launch import errors
from launch.lessons_pipeline import default_config, run_lessons
from launch.logs import configure_logging
from prm_jax.run_lock import RunLockedError, workdir_lock

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (every artifact goes here).")
_REPORT = flags.DEFINE_string("report", None, "Where to write the markdown report (default W/lessons_reproduced.md).")
flags.mark_flags_as_required(["workdir"])

config_flags.DEFINE_config_dict(
    "config", default_config(), "Lessons settings (launch.lessons_pipeline.default_config)."
)


#: What a rerun after a full disk does (`launch.errors`; `run_lessons` reuses what exists).
RERUN_NOTE = "it resumes: finished arms and checkpoints are kept"


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from launch.lessons_report import write_report

    configure_logging()
    # One lessons run per workdir at a time (a second is refused, naming the first); a file is refused too.
    with workdir_lock(_WORKDIR.value, "launch.lessons"):
        lessons = run_lessons(flags.FLAGS.config, _WORKDIR.value, say=lambda line: print(line, flush=True))
        report = Path(_REPORT.value or Path(_WORKDIR.value) / "lessons_reproduced.md")
        # The command as a reader would rerun it (the workdir and the report's place are theirs to choose).
        shown = [a for a in sys.argv[1:] if not a.startswith(("--workdir", "--report"))]
        command = " ".join(["python -m launch.lessons --workdir=W", *map(shlex.quote, shown)])
        write_report(lessons, report, command)
    for finding in lessons["findings"]:
        print(f"  {finding['reproduced']:>15}: {finding['title']}", flush=True)
    print(f"wrote {Path(_WORKDIR.value) / 'lessons.json'} and {report}", flush=True)
    sys.exit(0)


def run() -> None:
    """Console-script entry point (prm-jax-lessons): user errors exit 2 with one message."""
    from data_pipeline.context import SynthesisError
    from prm_jax.training.trainer import TrainingError

    errors.run(main, extra_user_errors=(SynthesisError, TrainingError, RunLockedError), rerun_note=RERUN_NOTE)


if __name__ == "__main__":
    run()
