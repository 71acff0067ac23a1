"""User errors at the launchers' front door: one message, a non-zero exit, no traceback.

Every launcher runs its `main` through `run`. The project raises errors with messages that
name the file, line, field or value at fault: its own error types (registered per launcher),
`ValueError` raised by its own validators, and path errors (`FileNotFoundError`, ...);
`run` prints such an error as one short block on stderr and exits with
`USER_ERROR_EXIT`. Anything else, including a `ValueError` raised inside jax, numpy or
orbax, is a bug and keeps its traceback. `--verbose_errors` shows the traceback of user errors too.

Flag parsing errors (an unknown flag, a bad enum or integer value, a missing required flag) and
`app.UsageError` are user errors as well: one `error: ...` line and the same exit status,
instead of absl's multi-line usage dump and exit 1. A full disk, a quota, a read-only file system,
a permission refused and a held lock are reported as one line naming the path, each with its own
remedy (space is freed; a read-only or forbidden path is swapped for another). What a rerun does
is said only by a launcher that knows (`run(..., rerun_note=...)`): a training run resumes, a
conversion starts over.
"""

from __future__ import annotations

import errno
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import app, flags

#: Exit status of a run refused or stopped for a reason the user fixes.
USER_ERROR_EXIT = 2

_VERBOSE = flags.DEFINE_bool("verbose_errors", False, "Show the traceback of user errors too (for bug reports).")


class UserError(Exception):
    """A problem the user fixes (configuration, paths, input data); the message says what and where."""


#: Always user errors: raised on purpose with a message that names what to fix. Library error types
#: meant for users are registered by the launchers that raise them (`extra_user_errors`).
USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)
#: A missing or unreadable path: the message names it, wherever it was raised.
PATH_ERRORS: tuple[type[BaseException], ...] = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)
#: User errors only when raised by this project's own code (its validators raise ValueError with a
#: message naming the field or file); the same type raised inside jax, numpy or orbax is a bug and
#: keeps its traceback.
OWN_CODE_ERRORS: tuple[type[BaseException], ...] = (ValueError,)
_OWN_PACKAGES = tuple(
    str(Path(__file__).resolve().parents[1] / name) + os.sep
    for name in ("prm_jax", "data_pipeline", "launch", "configs")
)


def _raised_by_own_code(error: BaseException) -> bool:
    """Whether the innermost frame of `error`'s traceback is in this project's source."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_OWN_PACKAGES)


#: OSErrors that are the environment's state, not a bug: (what happened, what the user does).
_ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: ("no space left on the device", "free space or choose another output directory"),
    errno.EDQUOT: ("disk quota exceeded", "free space within the quota or choose another output directory"),
    errno.EROFS: ("read-only file system", "choose an output directory on a writable file system"),
    errno.EACCES: ("permission denied", "choose a path you may use, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "choose a path you may use, or fix its permissions"),
}


def _path_of(error: BaseException) -> str | None:
    """The file an OSError names, looking through the errors it was raised from or during."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.filename:
            return os.fsdecode(current.filename)
        current = current.__cause__ or current.__context__
    return None


def environment_message(error: OSError, rerun_note: str | None = None) -> str | None:
    """One line for a full disk / quota / read-only FS / refused permission (naming the path), else None.

    `rerun_note` says what a rerun does (the launcher knows: "it resumes", "it starts over");
    without it nothing is promised.
    """
    known = _ENVIRONMENT_ERRNOS.get(error.errno)
    if known is None:
        return None
    reason, remedy = known
    path = _path_of(error)
    where = f"at {path}" if path else "(the system did not say which file: check the output directory's file system)"
    then = f", then rerun ({rerun_note})" if rerun_note else ", then rerun"
    return f"{reason} {where}: {remedy}{then}"


def user_message(
    error: BaseException, extra_user_errors: Sequence[type[BaseException]] = (), rerun_note: str | None = None
) -> str | None:
    """The one-line message of a user error, or None for a bug (which keeps its traceback)."""
    if isinstance(error, OSError):
        message = environment_message(error, rerun_note)
        if message is not None:
            return message
    if isinstance(error, USER_ERRORS + PATH_ERRORS + tuple(extra_user_errors)):
        return str(error)
    if isinstance(error, OWN_CODE_ERRORS) and _raised_by_own_code(error):
        return str(error)
    return None


def _fail(message: str) -> None:
    text = " ".join(message.split()) if "\n" not in message.strip() else message.strip()
    print(f"error: {text}", file=sys.stderr, flush=True)
    sys.exit(USER_ERROR_EXIT)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one `error:` line and exit 2 on a bad flag (absl: a usage dump, exit 1)."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        _fail(f"{error} (see --helpfull)")
    except OSError as error:  # a --flagfile or an ml_collections --config file that cannot be read
        _fail(" ".join(str(error).split()))
    except (AttributeError, KeyError) as error:  # ml_collections: --config.<field> the config lacks
        _fail(
            f"no such config field: {str(error).strip(chr(34) + chr(39))} (a typo in a --config.* flag? "
            "the config file lists the fields)"
        )
    raise AssertionError("unreachable")


def call(
    main: Callable[[list[str]], None],
    argv: list[str],
    extra_user_errors: Sequence[type[BaseException]] = (),
    *,
    rerun_note: str | None = None,
) -> None:
    """Run `main(argv)` (flags already parsed); a user error exits 2 with one `error:` line."""
    try:
        main(argv)
    except app.UsageError as error:
        _fail(str(error))
    except Exception as error:  # noqa: BLE001 - classified below; bugs are re-raised untouched
        message = user_message(error, extra_user_errors, rerun_note)
        if message is None:
            raise
        if flags.FLAGS.is_parsed() and _VERBOSE.value:
            traceback.print_exc()
        _fail(message)


def run(
    main: Callable[[list[str]], None],
    extra_user_errors: Sequence[type[BaseException]] = (),
    *,
    rerun_note: str | None = None,
) -> None:
    """`absl.app.run(main)`, with user errors printed as one line and exit status 2.

    `rerun_note` is what a rerun after a full disk does, when the launcher can promise it
    ("it resumes from the last checkpoint"); the message promises nothing otherwise.
    """
    app.run(lambda argv: call(main, argv, extra_user_errors, rerun_note=rerun_note), flags_parser=parse_flags)
