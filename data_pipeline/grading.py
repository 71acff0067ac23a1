"""Answer grading with math-verify, in worker processes with a hard per-item timeout.

Why a process pool of our own: math-verify turns answers into sympy objects, and sympy can run
for hours (or exhaust memory) on adversarial input such as a power tower `9^{9^{9^{9^9}}}`,
which sampled completions do produce. math-verify's own timeouts use `signal.alarm`, which only
works in a main thread and cannot interrupt long C-level work, so here they are switched off
(`parse(..., parsing_timeout=None)`, `verify(..., timeout_seconds=None)`; math-verify 0.9
API) and each item runs in a worker process with a wall-clock deadline: a worker that misses it
is SIGKILLed and replaced, and the item is graded `"timeout"` (counted, and incorrect). A
worker that dies (e.g. hitting `max_memory_mb`) grades its item `"error"`; the run goes on.

Workers are fresh interpreters (`python -m data_pipeline.grading --worker`) talking JSON lines
over pipes: never forks of the main process, which holds JAX and its threads (unsafe to fork).
A replacement starts in about a second and takes items once it reports ready.

Throughput: a result cache keyed by `(gold, answer)` (MC completions of one problem repeat the
same few answers; a cached timeout also stops one adversarial answer from costing its timeout
again), a string-equality fast path, and `None` answers graded `"no_answer"` without a worker.

Statuses: `correct`, `incorrect`, `no_answer`, `timeout`, `error`, `bad_gold` (the
gold fails `prm_jax.answers.answer_problem`, the rule the problem reader applies too, or does not
parse); only `correct` counts as correct.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Sequence

from prm_jax.answers import BAD_GOLD, CORRECT, INCORRECT, answer_problem, grade_answer, normalized_answer  # noqa: F401 - re-exported statuses

_log = logging.getLogger(__name__)

# The comparison itself (math-verify, string fast path) is prm_jax.answers': the same one Best-of-N
# voting uses. Here it gets what it lacks on its own: worker processes with a hard timeout.
NO_ANSWER, TIMEOUT, ERROR = "no_answer", "timeout", "error"


# ---------------------------------------------------------------------------- workers


def _die_with_parent() -> None:
    """Linux: SIGKILL this worker when its parent dies (a SIGKILLed run must not leave a worker
    stuck in sympy behind; an idle worker also exits on stdin EOF). The signal follows the thread
    that started the worker, so a pool is used from the thread that created it."""
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker_loop(max_memory_mb: int) -> None:
    """A grading worker: JSON `[gold, answer]` lines on stdin, one JSON status line each on stdout.

    It announces itself with `"ready"` once math-verify is imported, so start-up time never
    counts against an item's deadline.
    """
    if max_memory_mb > 0:
        import resource

        limit = max_memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its "timeout disabled" warnings
    _die_with_parent()
    import math_verify  # noqa: F401 - import before announcing readiness

    out = sys.stdout
    out.write('"ready"\n')
    out.flush()
    for line in sys.stdin:
        gold, answer = json.loads(line)
        try:
            status = grade_answer(gold, answer)
        except BaseException:  # noqa: BLE001 - MemoryError, RecursionError, sympy bugs
            status = ERROR
        out.write(json.dumps(status) + "\n")
        out.flush()


@dataclasses.dataclass
class GradingStats:
    items: int = 0
    cache_hits: int = 0
    fast_path: int = 0
    worker_calls: int = 0
    timeouts: int = 0
    errors: int = 0
    worker_restarts: int = 0


class _Worker:
    """One worker process and its line-buffered stdout."""

    def __init__(self, max_memory_mb: int) -> None:
        # A fresh interpreter (fork + exec), never a fork of this process: the caller holds JAX
        # and its threads, which are not fork-safe, and a fresh worker imports nothing but
        # math-verify.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "data_pipeline.grading", "--worker", str(max_memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            close_fds=True,
        )
        self.fd = self.process.stdout.fileno()
        os.set_blocking(self.fd, False)
        self.buffer = b""
        self.ready = False
        self.key: tuple[str, str] | None = None
        self.deadline = 0.0

    def send(self, key: tuple[str, str]) -> None:
        data = memoryview((json.dumps(list(key)) + "\n").encode("utf-8"))
        while data:  # an unbuffered pipe write may be partial for long answers
            data = data[self.process.stdin.write(data) :]

    def read_lines(self) -> list[str] | None:
        """Complete lines available now (call when the pipe is readable); None at EOF (exited)."""
        try:
            chunk = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        if not chunk:
            return None
        *lines, self.buffer = (self.buffer + chunk).split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def stop(self) -> None:
        try:
            self.process.stdin.close()  # EOF ends the worker loop
            self.process.wait(timeout=2)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()


class GradingPool:
    """Grades (gold, answer) pairs in worker processes with a hard per-item timeout.

    Args:
        workers: Worker processes. 0 grades in this process without a timeout (tests, debugging;
            never for sampled output).
        timeout_s: Wall-clock limit per item; a worker past it is killed and replaced.
        max_memory_mb: Address-space limit per worker (0 = none); an item that exceeds it is
            graded "error" instead of taking the machine down.
        cache_size: Results remembered per `(gold, answer)` (LRU).
    """

    def __init__(
        self, workers: int = 4, timeout_s: float = 5.0, *, max_memory_mb: int = 4096, cache_size: int = 200_000
    ) -> None:
        if workers < 0 or timeout_s <= 0:
            raise ValueError(f"need workers >= 0 and timeout_s > 0, got {workers}, {timeout_s}")
        self.num_workers = workers
        self.timeout_s = float(timeout_s)
        self.max_memory_mb = max_memory_mb
        self.cache_size = cache_size
        self.stats = GradingStats()
        self._cache: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
        self._workers: list[_Worker] = []
        if workers == 0:  # math-verify warns that its own timeouts are off: deliberate here
            logging.getLogger("math_verify").setLevel(logging.ERROR)

    # ------------------------------------------------------------------ lifecycle

    def _ensure_workers(self) -> None:
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self.max_memory_mb))

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers[self._workers.index(worker)] = _Worker(self.max_memory_mb)
        self.stats.worker_restarts += 1

    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def __enter__(self) -> GradingPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; close() is the contract
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

    # ------------------------------------------------------------------ grading

    def grade(self, gold: str, answer: str | None) -> str:
        return self.grade_many([(gold, answer)])[0]

    def grade_many(self, pairs: Sequence[tuple[str, str | None]]) -> list[str]:
        """One status per pair, in order. Never raises for a bad answer; never hangs."""
        results: list[str | None] = [None] * len(pairs)
        pending: dict[tuple[str, str], list[int]] = {}
        for i, (gold, answer) in enumerate(pairs):
            self.stats.items += 1
            if answer is None or not answer.strip():
                results[i] = NO_ANSWER
                continue
            if answer_problem(gold) is not None:  # before the fast path: `x}{y` must not equal itself
                results[i] = BAD_GOLD
                continue
            key = (gold, answer)
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                self.stats.cache_hits += 1
                results[i] = cached
            elif normalized_answer(gold) == normalized_answer(answer):
                self.stats.fast_path += 1
                results[i] = self._remember(key, CORRECT)
            else:
                pending.setdefault(key, []).append(i)
        if pending:
            graded = (
                self._grade_inline(list(pending)) if self.num_workers == 0 else self._grade_in_workers(list(pending))
            )
            for key, status in graded.items():
                self._remember(key, status)
                for i in pending[key]:
                    results[i] = status
        return [r if r is not None else ERROR for r in results]

    def _remember(self, key: tuple[str, str], status: str) -> str:
        if status == TIMEOUT:
            self.stats.timeouts += 1
        elif status == ERROR:
            self.stats.errors += 1
        self._cache[key] = status
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return status

    def _grade_inline(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
        out = {}
        for gold, answer in keys:
            try:
                out[(gold, answer)] = grade_answer(gold, answer)
            except Exception:  # noqa: BLE001
                out[(gold, answer)] = ERROR
        self.stats.worker_calls += len(keys)
        return out

    def _grade_in_workers(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], str]:
        self._ensure_workers()
        queue = collections.deque(keys)
        out: dict[tuple[str, str], str] = {}
        startup_limit = max(60.0, 10 * self.timeout_s)
        startup_deadline = time.monotonic() + startup_limit
        while queue or any(w.key is not None for w in self._workers):
            for worker in self._workers:
                if worker.ready and worker.key is None and queue:
                    key = queue.popleft()
                    try:
                        worker.send(key)
                    except OSError:  # died while idle: replace it and retry the item
                        queue.appendleft(key)
                        self._replace(worker)
                        continue
                    worker.key, worker.deadline = key, time.monotonic() + self.timeout_s
                    self.stats.worker_calls += 1
            busy = [w for w in self._workers if w.key is not None]
            starting = [w for w in self._workers if not w.ready]
            deadlines = [w.deadline for w in busy] + ([startup_deadline] if starting else [])
            wait_s = max(0.0, min(deadlines) - time.monotonic()) if deadlines else 0.0
            ready_fds = {key.fd for key, _ in self._selector(busy + starting).select(timeout=wait_s)}
            now = time.monotonic()
            for worker in list(self._workers):
                lines = worker.read_lines() if worker.fd in ready_fds else []
                if lines is None:  # exited: on an item (memory limit, crash) or while starting
                    if worker.key is not None:
                        out[worker.key] = ERROR
                    elif not worker.ready:
                        raise RuntimeError(
                            "a grading worker exited during start-up "
                            f"(exit code {worker.process.returncode}); is math-verify installed?"
                        )
                    worker.key = None
                    self._replace(worker)
                    continue
                for message in lines:
                    if message == "ready":
                        worker.ready = True
                    elif worker.key is not None:
                        out[worker.key] = message
                        worker.key = None
                if worker.key is not None and now >= worker.deadline:
                    out[worker.key] = TIMEOUT
                    _log.warning(
                        "grading timed out after %.1fs (worker killed and replaced): answer %.80r",
                        self.timeout_s,
                        worker.key[1],
                    )
                    worker.key = None
                    self._replace(worker)
            if starting and now >= startup_deadline and not any(w.ready for w in self._workers):
                raise RuntimeError(f"grading workers did not start within {startup_limit:.0f}s")
        return out

    @staticmethod
    def _selector(workers: list[_Worker]) -> selectors.BaseSelector:
        selector = selectors.DefaultSelector()
        for worker in workers:
            selector.register(worker.fd, selectors.EVENT_READ)
        return selector


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    _worker_loop(int(sys.argv[2]))
