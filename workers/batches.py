"""Micro-batched tasks: many messages, one transaction (celery-batches, with the fleet's guards).

The events worker ingests single-event messages and the workflows worker runs
step messages in buffers of up to N messages or a few milliseconds. celery-batches
collects them in the consumer and hands each buffer to a pool process as one call.

Three things are added to celery-batches here:

* buffers follow the pool: a message that finds a pool process idle is handed over
  at once (no waiting for company when there is none to wait for), and while every
  process is busy the buffer grows, up to `flush_every`, until one is free. Plain
  celery-batches flushes every `flush_interval` whatever the pool does, which under a
  backlog queues one-message buffers behind busy processes: batches never form;

* the fleet's refusals (expired, far-ETA, misrouted messages are dead-lettered
  before they run; `workers.rejected.GuardedStrategy`);
* delayed messages (an ETA, e.g. a step sent for a timer due in 800 ms) wait in the
  consumer's timer, not in the batch buffer, and do not count against the prefetch
  limit meanwhile, as Celery's own strategy does for ETA tasks. Otherwise a worker
  holding `prefetch` delayed messages would stop fetching anything else until the
  first was due, and celery-batches would re-check every waiting message on every
  flush tick.

celery-batches acknowledges a buffer when its function returns, even if it raised:
the function must therefore never return before every message of the buffer is
safe (committed, re-published or dead-lettered; see `workers.engine.batch` and
`workers.events.micro_batch`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Collection
from typing import Any

from celery_batches import Batches, SimpleRequest
from celery_batches.trace import apply_batches_task

from workers.rejected import GuardedStrategy, eta_of


class FleetBatches(GuardedStrategy, Batches):
    """celery-batches' task with the fleet's refusals, delayed messages kept aside, and
    buffers that grow while every pool process is busy."""

    abstract = True
    _in_flight = 0  # buffers handed to the pool and not returned yet (the consumer's count)

    def _busy(self) -> bool:
        return self._in_flight >= max(int(getattr(self._pool, "limit", 1) or 1), 1)

    def _do_flush(self) -> None:
        """Flush the buffer, unless every pool process is busy and the buffer is not full.

        celery-batches flushes every `flush_interval`: under a backlog that queues
        one-message jobs behind busy pool processes, and batches never form. Here
        the buffer keeps growing instead, and a pool process that finishes a buffer
        takes the next one at once (`flush`'s return callback).
        """
        if self._busy() and self._buffer.qsize() < self.flush_every:
            return
        super()._do_flush()

    def _flush_if_idle(self) -> None:
        """A message that finds a pool process idle goes at once: waiting for company
        only pays while every process is busy (then the buffer grows by itself)."""
        if not self._busy() and not self._buffer.empty():
            super()._do_flush()

    def flush(self, requests: Collection[Any]) -> Any:
        """celery-batches' flush, counting buffers in flight (acks exactly as it does)."""
        acks_late = [r for r in requests if r.task.acks_late]
        acks_early = [r for r in requests if not r.task.acks_late]
        serializable = ([SimpleRequest.from_request(r) for r in requests],)

        def on_accepted(pid: int, time_accepted: float) -> None:
            for req in acks_early:
                req.acknowledge()

        def on_return(result: Any) -> None:
            for req in acks_late:
                req.acknowledge()
            returned()

        def returned(*_: Any) -> None:  # also when the process died: nothing is acked then
            self._in_flight = max(self._in_flight - 1, 0)
            if not self._buffer.empty():
                self._do_flush()

        self._in_flight += 1
        return self._pool.apply_async(apply_batches_task, (self, serializable, 0, None),
                                      accept_callback=on_accepted, callback=on_return,
                                      error_callback=returned)

    def Strategy(self, task: Any, app: Any, consumer: Any) -> Callable[..., Any]:  # noqa: N802
        handler: Callable[..., Any] = super().Strategy(task, app, consumer)
        timer = consumer.timer  # consumer.qos exists only once the consumer runs: read it then

        def deferring(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any,
                      **kw: Any) -> None:
            eta = eta_of(message)
            delay = (eta - dt.datetime.now(dt.UTC)).total_seconds() if eta else 0.0
            if delay <= 0:
                handler(message, body, ack, reject, callbacks, **kw)
                self._flush_if_idle()
                return
            consumer.qos.increment_eventually()  # this one waits: let the consumer fetch more

            def due() -> None:
                consumer.qos.decrement_eventually()
                handler(message, body, ack, reject, callbacks, **kw)
                self._flush_if_idle()

            timer.call_after(delay, due, priority=6)

        return deferring
