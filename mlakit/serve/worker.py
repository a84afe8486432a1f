"""The engine's loop on its own thread, fed by the HTTP handlers (nothing blocks the event loop).

Handlers call :meth:`EngineWorker.submit` (returns an ``asyncio.Queue`` of
:class:`~mlakit.engine.StreamEvent`) and :meth:`EngineWorker.cancel`; both only enqueue a command.
The loop thread applies commands between engine steps (so requests join and leave between
steps, as continuous batching wants), runs :meth:`Engine.step` while anything is unfinished, and
hands each event to its request's queue through ``loop.call_soon_threadsafe``. Idle, it waits on
a condition instead of spinning.

A request the engine refuses gets one event with ``error`` set. If a step itself fails, every
request in that step gets an error event and the engine is rebuilt with an empty cache, so one
bad step cannot take the server down.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlakit.engine import Engine, StreamEvent
from mlakit.errors import MlakitError
from mlakit.generate import SamplingConfig

logger = logging.getLogger(__name__)

#: ``finish_reason`` of a request failed by the server itself (a failed engine step), not by its input
INTERNAL_ERROR = "internal_error"


@dataclass
class _Pending:
    request_id: str
    prompt: list[int]
    sampling: SamplingConfig
    stop_strings: tuple[str, ...]
    queue: asyncio.Queue[StreamEvent]
    loop: asyncio.AbstractEventLoop


class EngineWorker:
    """Owns ``engine`` and drives it from a daemon thread.

    Args:
        make_engine: builds the engine (called once at start and again after a failed step).
    """

    def __init__(self, make_engine: Callable[[], Engine]) -> None:
        self._make_engine = make_engine
        self.engine = make_engine()
        self._commands: deque[tuple[str, Any]] = deque()
        self._live: dict[str, _Pending] = {}
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="mlakit-engine", daemon=True)

    # -- called from the event loop ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything still running and stop the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)

    def submit(
        self, request_id: str, prompt: list[int], sampling: SamplingConfig, stop_strings: tuple[str, ...] = ()
    ) -> asyncio.Queue[StreamEvent]:
        """Queue a request; its events arrive on the returned queue (the last has ``finished``)."""
        queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        pending = _Pending(request_id, prompt, sampling, stop_strings, queue, asyncio.get_running_loop())
        with self._cond:
            self._commands.append(("add", pending))
            self._cond.notify()
        return queue

    def cancel(self, request_id: str) -> None:
        """Stop a request (a client went away): its cache blocks are freed before the next step."""
        with self._cond:
            self._commands.append(("cancel", request_id))
            self._cond.notify()

    @property
    def num_pending(self) -> int:
        """Requests accepted and not finished (running, waiting in the engine, or about to be added)."""
        with self._cond:
            return len(self._live) + sum(1 for kind, _ in self._commands if kind == "add")

    def stats(self) -> dict[str, int]:
        return self.engine.stats()

    # -- the loop thread ---------------------------------------------------------------------

    def _deliver(self, pending: _Pending, event: StreamEvent) -> None:
        pending.loop.call_soon_threadsafe(pending.queue.put_nowait, event)
        if event.finished:
            self._live.pop(pending.request_id, None)

    def _apply(self, kind: str, arg: Any) -> None:
        if kind == "add":
            pending: _Pending = arg
            try:
                self.engine.add_request(pending.prompt, pending.sampling, pending.stop_strings, pending.request_id)
            except MlakitError as e:
                self._deliver(
                    pending, StreamEvent(pending.request_id, None, finished=True, finish_reason="error", error=str(e))
                )
                return
            self._live[pending.request_id] = pending
        elif kind == "cancel" and arg in self._live:
            self.engine.cancel(arg)  # frees its blocks now; its "cancelled" event comes with the next step

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._commands and not self.engine.has_unfinished():
                    self._cond.wait()
                if self._stop:
                    break
                commands = list(self._commands)
                self._commands.clear()
            for kind, arg in commands:
                self._apply(kind, arg)
            if not self.engine.has_unfinished():
                continue
            try:
                events = self.engine.step()
            except Exception as e:  # a failed step fails its requests, not the server
                logger.exception("engine step failed; failing its %d requests and resetting the cache", len(self._live))
                for pending in list(self._live.values()):
                    self._deliver(
                        pending,
                        StreamEvent(
                            pending.request_id,
                            None,
                            finished=True,
                            finish_reason=INTERNAL_ERROR,
                            error=f"internal error: {e}",
                        ),
                    )
                self.engine = self._make_engine()
                continue
            for event in events:
                target = self._live.get(event.request_id)
                if target is not None:
                    self._deliver(target, event)
        for rid, pending in list(self._live.items()):
            self.engine.cancel(rid)
            self._deliver(pending, StreamEvent(rid, None, finished=True, finish_reason="cancelled"))
