"""The engine's own thread, and the bridge between it and the asyncio HTTP handlers.

The engine (and under torchrun, the call broadcast to the other ranks) runs on one dedicated thread that steps
whenever there is work. Handlers submit requests (Engine.add is thread-safe) and receive their events on an
asyncio.Queue, filled through loop.call_soon_threadsafe once per forward (all of its events together). Cancelling
a request only sets a flag; the engine frees its slot at the start of the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from dsv4.common.runtime.engine import FINISH_ABORT, Engine, Event, Request, SamplingParams
from dsv4.common.serve.metrics import Metrics

log = logging.getLogger("dsv4.serve")
HEARTBEAT_S = 10.0  # idle rank 0 pings the other ranks well inside the collectives' timeout (distributed.py)


class EngineLoop:
    def __init__(self, engine: Engine, metrics: Metrics | None = None) -> None:
        self.engine, self.metrics = engine, metrics
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="dsv4-engine", daemon=True)
        self.failed: str | None = None  # a crash of the loop itself (not of a request): /health reports it
        # events of the forward in progress (engine thread only); flush() hands them to their asyncio loops in one
        # call_soon_threadsafe per loop, not one per token: each call wakes the loop and takes the GIL from the engine
        self.outbox: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, tuple[int, Event]]] = []
        engine.on_forward = self.flush

    def start(self) -> None:
        self.thread.start()

    def submit(self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop,
               queue: asyncio.Queue, tag: int = 0) -> Request:
        """Queue a request; its events arrive on `queue` as (tag, Event). Raises the engine's ParamError,
        ContextLengthError or QueueFull."""

        def deliver(ev: Event) -> None:  # on the engine thread: kept until the forward that made it is done
            if ev.finished and self.metrics is not None:
                self.metrics.finished(ev.request)
            self.outbox.append((loop, queue, (tag, ev)))

        req = Request(prompt, params, on_event=deliver)
        self.engine.add(req)
        with self.wake:
            self.wake.notify()
        return req

    def flush(self) -> None:
        """Hand the events so far to their request queues (engine thread: after each forward and each step)."""
        if not self.outbox:
            return
        box, self.outbox = self.outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, tuple[int, Event]]]] = {}
        for loop, queue, item in box:
            by_loop.setdefault(loop, []).append((queue, item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is left to read these events
                log.warning("dropped %d events of a closed event loop", len(items))

    def cancel(self, req: Request) -> None:
        if not req.finished:
            self.engine.cancel(req)
            with self.wake:
                self.wake.notify()

    def stop(self, timeout: float = 10.0) -> None:
        """End the loop: requests still in the engine end with finish_reason "abort"; the other ranks are released."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        self.thread.join(timeout)

    def _run(self) -> None:
        eng, last = self.engine, time.monotonic()
        try:
            while True:
                with self.wake:
                    while not self.stopping and not eng.has_work():
                        self.wake.wait(HEARTBEAT_S / 2)
                        if time.monotonic() - last > HEARTBEAT_S:
                            eng.runner.ping()
                            last = time.monotonic()
                    if self.stopping:
                        break
                eng.step()
                self.flush()  # events outside any forward (cancelled or aborted requests)
                last = time.monotonic()
        except Exception as e:  # noqa: BLE001  a bug in the scheduler itself: report it, fail what is in flight
            log.exception("engine loop failed")
            self.failed = f"{type(e).__name__}: {e}"
        finally:
            with eng.lock:
                pending = list(eng.waiting) + list(eng.active)
            for r in pending:
                eng.cancel(r)
            try:
                if pending and self.failed is None:
                    eng.step()  # the cancelled requests leave with "abort" events
            finally:
                for r in pending:
                    if not r.finished and r.on_event is not None:
                        r.finish_reason = FINISH_ABORT
                        r.status = "finished"
                        r.on_event(Event(r, None, "", None, True))
                self.flush()
                eng.close()


def _put_all(items: list[tuple[asyncio.Queue, tuple[int, Event]]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
