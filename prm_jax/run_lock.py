"""One lock per run directory: a second writer is refused at the door, never interleaved.

Every tool that writes a run (training, synthesis, the demo, the lessons) holds `W/.run.lock` while
it runs, and a second process is refused in one line that names the holder:

    W is in use by pid 1234 on host h (launch.train, started 2025-01-31 12:00:00 UTC); ...

The lock is `fcntl.flock`: it dies with its process (a SIGKILL, an OOM kill, a node reboot), so it
is never stale and never needs deleting. The file itself only says who holds it (one JSON line per
holder: pid, host, tool, start), for the refusal; a record left by a dead holder is ignored when
the holder ran on this host and no longer lives.

Exclusive holders (a training run, the demo) exclude everyone; shared holders (the synthesis shards
of one workdir, each on its own node) exclude only exclusive ones, and can ask whether they are
alone (`HeldLock.alone`). The same mechanism locks smaller things (one synthesis stage shard, a file
updated in turn) through `hold`. A process that already holds a workdir's lock may take it again
(the launcher and the library function it calls both lock the workdir): nested holds are counted,
not re-locked, since two flock descriptors of one file in one process would exclude each other.

On a shared filesystem flock must reach across hosts: NFS does (Linux maps it onto NFS byte-range
locks), Lustre needs the `flock` mount option. A file system without flock refuses a lock that must
keep a second writer out (`LocksUnsupportedError`, one line); a lock that only marks what is whose
(`hold(required=False)`: a staging directory's writer, `prm_jax.files`) goes on unenforced. Whether
a lock file was left behind by holders that are gone is told by trying to take it (`abandoned`).
Multi-host jobs decide who locks (one process per job for training: `prm_jax.training.run`), since
every process of one job writes the same workdir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

#: The lock file of a run directory.
LOCK_FILE = ".run.lock"

# flock unsupported: some network and FUSE file systems, Lustre mounted without `flock`.
_NO_FLOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS})


class RunLockedError(RuntimeError):
    """Another process holds the lock; the message names it (pid, host, tool, start) and what to do."""


class LocksUnsupportedError(RunLockedError):
    """The lock file's file system has no flock: a second writer could not be kept out (or a holder's
    life could not be told); the message names the file and what to do."""

    @classmethod
    def at(cls, path: Path, what: str) -> LocksUnsupportedError:
        return cls(
            f"{path}: this file system does not support flock, so {what}: use a local disk or a file system "
            "with locks (NFS with its lock service, Lustre mounted with -o flock)"
        )


def _flock(fd: int, operation: int) -> bool:
    """`fcntl.flock(fd, operation)`; False when the file system has no flock (BlockingIOError, with
    LOCK_NB, when another process holds it)."""
    try:
        fcntl.flock(fd, operation)
    except OSError as error:
        if error.errno not in _NO_FLOCK:
            raise
        return False
    return True


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a lock, as recorded in the lock file."""

    pid: int
    host: str
    tool: str
    started: str

    @classmethod
    def of_this_process(cls, tool: str) -> Holder:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        return cls(pid=os.getpid(), host=socket.gethostname(), tool=tool, started=started)

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} ({self.tool}, started {self.started})"

    def is_dead(self) -> bool:
        """Known dead: it ran on this host and its pid is gone (another host's cannot be asked)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's
            return False
        return False


def _recorded(text: str) -> list[Holder]:
    """The holders a lock file's text records, unreadable lines left out."""
    holders = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
            holder = Holder(int(record["pid"]), str(record["host"]), str(record["tool"]), str(record["started"]))
        except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: a deeply nested line
            continue  # a line being written, or a foreign file: the refusal says "another process"
        if holder not in holders:
            holders.append(holder)
    return holders


def read_holders(path: Path) -> list[Holder]:
    """The holders a lock file records, dead ones and unreadable lines left out."""
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    return [holder for holder in _recorded(text) if not holder.is_dead()]


def describe_holders(holders: list[Holder], limit: int = 3) -> str:
    if not holders:
        return "another process (it has not recorded itself yet)"
    shown = ", ".join(h.describe() for h in holders[:limit])
    more = len(holders) - limit
    return shown + (f" and {more} more" if more > 0 else "")


@dataclasses.dataclass(frozen=True)
class HeldLock:
    """A lock this process holds (`fd` is the flocked descriptor; not `enforced`: a file system
    without flock, for a `hold(required=False)`)."""

    path: Path
    fd: int
    shared: bool
    enforced: bool = True

    def alone(self) -> bool:
        # Briefly exclusive: a shared taker arriving meanwhile waits it out (`_take_shared`).
        """For a shared hold: whether no other process holds the lock now (this process's hold
        stays shared either way). An exclusive hold is alone by definition."""
        if not self.shared:
            return True
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_SH)
        return True


@dataclasses.dataclass
class _Reentrant:
    held: HeldLock
    depth: int = 1


# Reentrant locks this process holds, by lock file: the launcher and the library function it calls
# both lock the workdir (flock belongs to an open file description: a second descriptor of the same
# file in this process would be refused by the first).
_held: dict[Path, _Reentrant] = {}
_held_guard = threading.Lock()


def _record(fd: int, holder: Holder, *, replace: bool) -> None:
    """Write this process's line into the lock file: alone, it replaces the file (dropping the
    lines of holders long gone); beside other shared holders, it appends."""
    line = (json.dumps(dataclasses.asdict(holder), sort_keys=True) + "\n").encode("utf-8")
    if replace:
        os.ftruncate(fd, 0)
        os.pwrite(fd, line, 0)
    else:
        os.lseek(fd, 0, os.SEEK_END)
        os.write(fd, line)


# Shared holders hold the lock exclusively for a moment (writing their line alone, asking `alone`):
# a shared taker arriving then retries this long before it decides an exclusive holder has it.
_SHARED_PATIENCE_S = 3.0


def _take_shared(fd: int, *, wait: bool) -> bool:
    """flock `fd` shared; False when the lock stays held exclusively for `_SHARED_PATIENCE_S` (an
    exclusive holder: training, the demo), rather than for a shared holder's moment."""
    if wait:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return True
    deadline = time.monotonic() + _SHARED_PATIENCE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)


def _acquire(fd: int, path: Path, *, shared: bool, wait: bool, holder: Holder, refusal: str, required: bool) -> bool:
    """flock `fd` (exclusive, or shared) and record `holder`; refuse with `refusal` (its `{holder}`
    names who holds the lock) when another process holds it and `wait` is false. Returns whether the
    lock is enforced: False on a file system without flock, which is refused unless not `required`."""

    def refuse() -> RunLockedError:
        return RunLockedError(refusal.format(holder=describe_holders(read_holders(path))))

    try:
        if not _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):
            if required:
                raise LocksUnsupportedError.at(path, "a second writer could not be kept out")
            _record(fd, holder, replace=False)  # the file still says whose it is
            return False
        alone = True
    except BlockingIOError:
        if not shared and not wait:
            raise refuse() from None
        alone = False
    if alone:
        _record(fd, holder, replace=True)
        if shared:
            # Not atomic (flock drops, then takes): an exclusive taker in between wins, and is named;
            # a shared one in between holds it exclusively only for a moment, which is waited out.
            if not _take_shared(fd, wait=wait):
                raise refuse()
        return True
    if shared:
        if not _take_shared(fd, wait=wait):
            raise refuse()
    else:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise refuse() from None
    _record(fd, holder, replace=not shared)
    return True


@contextlib.contextmanager
def hold(
    path: str | Path,
    *,
    tool: str,
    refusal: str,
    shared: bool = False,
    wait: bool = False,
    reentrant: bool = False,
    required: bool = True,
    on_release: Callable[[], None] | None = None,
) -> Iterator[HeldLock]:
    """Hold the lock file `path` (created with its directory) while the block runs.

    Another holder: raise `RunLockedError(refusal.format(holder=...))`, or with `wait` block until
    it is free (a short update taken in turn). `tool` names this process in the file. A second
    hold by this same process is refused like any other, unless both are `reentrant` (then nested
    holds are counted; a shared hold cannot become exclusive by nesting). On a file system without
    flock: `LocksUnsupportedError`, or, when not `required`, the block runs unenforced (the file
    still records this holder). `on_release` runs as an exclusive hold ends, before the lock is
    released (it may remove the lock file).
    """
    path = Path(path).absolute()
    if reentrant:
        with _held_guard:
            nested = _held.get(path)
            if nested is not None:
                if nested.held.shared and not shared:
                    raise RuntimeError(f"{path}: this process holds the lock shared and asks for it exclusive")
                nested.depth += 1
        if nested is not None:
            try:
                yield nested.held
            finally:
                with _held_guard:
                    nested.depth -= 1
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, enforced = _open_and_lock(
        path, shared=shared, wait=wait, holder=Holder.of_this_process(tool), refusal=refusal, required=required
    )
    try:
        held = HeldLock(path, fd, shared, enforced)
        if reentrant:
            with _held_guard:
                _held[path] = _Reentrant(held)
        try:
            yield held
        finally:
            if reentrant:
                with _held_guard:
                    _held.pop(path, None)
            if on_release is not None and not shared:
                on_release()  # still held: nobody else can take the file while it is removed
            _forget(held)
    finally:
        os.close(fd)  # releases the flock


def _forget(held: HeldLock) -> None:
    """Drop this holder's record as it leaves, when no other holder's line could be lost (an
    exclusive hold, or a shared one now alone): a finished run leaves an empty lock file, so a rerun
    that changes nothing leaves it as it found it. A shared holder beside others leaves its line,
    which readers ignore once its process is gone."""
    if not held.enforced:
        return
    with contextlib.suppress(OSError):  # BlockingIOError included: others hold it, their lines stay
        if held.shared:  # alone: take it exclusive, so no holder arriving now appends meanwhile
            fcntl.flock(held.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(held.fd, 0)


def _open_and_lock(
    path: Path, *, shared: bool, wait: bool, holder: Holder, refusal: str, required: bool
) -> tuple[int, bool]:
    """The descriptor of `path`, flocked, and whether the lock is enforced. A holder (or a cleaner,
    `abandoned`) may remove the file as it releases it, so a lock taken on a file that is no longer
    at `path` is retried on the new one: two processes never hold locks on two different files of
    one name."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            enforced = _acquire(fd, path, shared=shared, wait=wait, holder=holder, refusal=refusal, required=required)
        except BaseException:
            os.close(fd)
            raise
        if _still_at(fd, path):
            return fd, enforced
        os.close(fd)


def _still_at(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the file at `path` (not removed or replaced since)."""
    try:
        current = os.stat(path)
    except FileNotFoundError:
        return False
    locked = os.fstat(fd)
    return (locked.st_dev, locked.st_ino) == (current.st_dev, current.st_ino)


@contextlib.contextmanager
def abandoned(path: str | Path) -> Iterator[list[Holder] | None]:
    """Whether the lock file `path` was left behind by holders that are gone, told by trying to take
    it without waiting (a live holder, on any host, keeps its flock).

    Left behind: yields the holders it records (dead ones: who left it; possibly none) while holding
    it, so no other process acts on what it guarded meanwhile; the caller may remove the file in the
    block. Held by a live process, or gone: yields None. A file system without flock, where this
    cannot be told: `LocksUnsupportedError`.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        yield None
        return
    try:
        try:
            locked = _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            locked = None  # a live holder
        if locked is False:
            raise LocksUnsupportedError.at(path, "whether its holder lives cannot be told")
        if not locked or not _still_at(fd, path):  # held, or removed by another cleaner since the open
            yield None
            return
        yield _recorded(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))
    finally:
        os.close(fd)  # releases the flock


def check_directory(workdir: str | Path, flag: str = "--workdir") -> Path:
    """`workdir` as a Path, refused in one line when it exists and is not a directory."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise NotADirectoryError(f"{flag}={workdir} is a file, not a directory: choose a directory")
    return workdir


@contextlib.contextmanager
def workdir_lock(
    workdir: str | Path, tool: str, *, shared: bool = False, flag: str = "--workdir"
) -> Iterator[HeldLock]:
    """Hold the run directory `workdir`'s lock (`W/.run.lock`; the directory is created) while the
    block runs; another holder is refused in one line naming its pid, host, tool and start. An
    exclusive holder that wrote nothing else leaves no lock file (nor a directory it created)."""
    workdir = check_directory(workdir, flag)
    created = not workdir.exists()
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file appeared, or a path component is a file
        raise NotADirectoryError(f"{flag}={workdir}: a path component is a file, not a directory") from None
    except OSError as error:
        if error.errno != errno.ENOTDIR:
            raise
        raise NotADirectoryError(f"{flag}={workdir}: a path component is a file, not a directory") from None
    if shared:
        refusal = (
            f"{workdir} is in use by {{holder}}, which writes it alone: wait for it to finish, or use another {flag}"
        )
    else:
        refusal = (
            f"{workdir} is in use by {{holder}}; two runs writing one directory would overwrite each other's "
            f"checkpoints and records: wait for it to finish, or give this run its own {flag}"
        )

    def leave_no_trace() -> None:
        # A run refused before it wrote anything leaves the directory as it found it (absent, or empty).
        if [p.name for p in workdir.iterdir()] == [LOCK_FILE]:
            (workdir / LOCK_FILE).unlink()
            if created:
                workdir.rmdir()

    lock = workdir / LOCK_FILE
    with contextlib.ExitStack() as stack:
        try:
            held = stack.enter_context(
                hold(lock, tool=tool, refusal=refusal, shared=shared, reentrant=True, on_release=leave_no_trace)
            )
        except LocksUnsupportedError:
            leave_no_trace()  # nobody can hold a lock there: the file this attempt created goes
            raise
        yield held


__all__ = [
    "LOCK_FILE",
    "Holder",
    "HeldLock",
    "LocksUnsupportedError",
    "RunLockedError",
    "abandoned",
    "check_directory",
    "describe_holders",
    "hold",
    "read_holders",
    "workdir_lock",
]
