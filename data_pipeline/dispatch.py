"""How a stage's generation work runs: tasks that yield generate calls, driven serially or concurrently.

A stage states its generation work as *tasks*: generators that yield `Generation`s (one
`backend.generate` call each: a batch of prompts with their sampling params), are sent the outputs
back, and yield the items the stage writes (records, error records). The stage logic lives in the
tasks only; `drive` runs them on any backend:

* an ordinary backend (one engine in this process): one call at a time, task after task, which
  is exactly the serial loop the stages always ran;
* a `ConcurrentBackend` (`data_pipeline.ray_runner.RayGenerationPool`: engines on Ray workers):
  up to `max_in_flight` calls outstanding, each task resumed as its call returns, so an idle
  worker always finds the next batch (dynamic balancing) while the driver grades and writes.

sample and judge make one task per batch, the very batches a single-process run forms, and ask
for `ordered` output: a task's items are released after those of every earlier task, so their
stage files have the single-process run's lines in the single-process run's order. mc makes
`lanes(backend)` tasks, each a continuous-batching labeller pulling responses from one shared
queue (one lane on an ordinary backend: today's loop), released as they finish.

Nothing here imports Ray; the pool does, lazily.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

from prm_jax.generation.types import GenerationBackend, Prompt, RequestOutput, SamplingParams


@dataclasses.dataclass(frozen=True)
class Generation:
    """One `generate` call of a task: prompts, their params, and the record ids it serves (logs, errors)."""

    prompts: Sequence[Prompt]
    params: Sequence[SamplingParams]
    ids: tuple[str, ...] = ()


#: A task yields Generations (and is sent their outputs) and items to write (and is sent None).
Task = Generator[Any, Any, None]


@runtime_checkable
class ConcurrentBackend(Protocol):
    """A backend that runs several `generate` calls at once (engines on other processes or nodes).

    `submit` queues a call and returns its ticket; `wait` blocks until at least one submitted call
    has finished and returns `(ticket, outputs)` pairs; `cancel` forgets tickets whose outputs are
    no longer wanted (a stage that stopped). Outputs are what `generate` returns for the call.
    """

    tokenizer: Any
    max_in_flight: int

    def generate(
        self, prompts: Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[RequestOutput]: ...

    def submit(self, generation: Generation) -> int: ...

    def wait(self) -> list[tuple[int, list[RequestOutput]]]: ...

    def cancel(self, tickets: Iterable[int]) -> None: ...


def lanes(backend: GenerationBackend) -> int:
    """How many independent task streams keep `backend` busy (1 for an in-process engine)."""
    return int(backend.max_in_flight) if isinstance(backend, ConcurrentBackend) else 1


def drive(backend: GenerationBackend, tasks: Iterable[Task], *, ordered: bool) -> Iterator[Any]:
    """Run `tasks` on `backend` and yield the items they yield (see the module docstring).

    `ordered`: every item of task i comes before any item of task i + 1. Otherwise items come as
    their tasks produce them. Tasks are pulled from `tasks` lazily, only when there is room.
    """
    if isinstance(backend, ConcurrentBackend) and backend.max_in_flight > 1:
        yield from _drive_concurrently(backend, tasks, ordered=ordered)
        return
    for task in tasks:
        reply = None
        while True:
            try:
                item = task.send(reply)
            except StopIteration:
                break
            if isinstance(item, Generation):
                reply = backend.generate(list(item.prompts), list(item.params))
            else:
                reply = None
                yield item


@dataclasses.dataclass
class _Slot:
    task: Task
    items: list[Any] = dataclasses.field(default_factory=list)
    done: bool = False


def _drive_concurrently(backend: ConcurrentBackend, tasks: Iterable[Task], *, ordered: bool) -> Iterator[Any]:
    capacity = backend.max_in_flight
    # Ordered output holds finished tasks back until the earlier ones finish; this bounds how far
    # ahead of the oldest unfinished task the dispatch may run (memory, and what a kill loses).
    window = 4 * capacity
    source = iter(tasks)
    slots: list[_Slot] = []  # started, not yet fully released, in task order
    waiting: dict[int, _Slot] = {}
    exhausted = False

    def advance(slot: _Slot, reply: Any) -> None:
        while True:
            try:
                item = slot.task.send(reply)
            except StopIteration:
                slot.done = True
                return
            reply = None
            if isinstance(item, Generation):
                waiting[backend.submit(item)] = slot
                return
            slot.items.append(item)

    try:
        while True:
            while not exhausted and len(waiting) < capacity and len(slots) < window:
                task = next(source, None)
                if task is None:
                    exhausted = True
                    break
                slot = _Slot(task)
                slots.append(slot)
                advance(slot, None)
            released = []
            for slot in slots:
                yield from slot.items
                slot.items.clear()
                if not slot.done:
                    if ordered:
                        break
                    continue
                released.append(slot)
            for slot in released:
                slots.remove(slot)
            if not waiting:
                if exhausted and not slots:
                    return
                continue
            for ticket, outputs in backend.wait():
                advance(waiting.pop(ticket), outputs)
    finally:
        if waiting:  # the consumer stopped (an error): nobody wants these outputs any more
            backend.cancel(list(waiting))
