"""The engine's loop, fed by the HTTP handlers: in its own process (default) or on a thread.

Handlers call ``submit`` (returns an ``asyncio.Queue`` of :class:`~mlakit.engine.StreamEvent`) and
``cancel``; both only enqueue a command, so nothing blocks the event loop. The loop applies
commands between engine steps (requests join and leave between steps, as continuous batching
wants), runs :meth:`Engine.step` while anything is unfinished, and each event reaches its
request's queue through ``loop.call_soon_threadsafe``. Idle, it blocks instead of spinning.

Two homes for that loop, one body (:class:`EngineCore`):

* :class:`EngineProcess` (``mlakit serve``'s default) runs it in a child process, as vLLM V1 runs
  its EngineCore apart from the API server. The reason is the GIL: an engine step is mostly C/ATen
  work, but it takes the GIL back between ops, and on a thread beside the event loop it waits for
  whatever Python the loop is running (uvicorn, JSON, SSE, metrics: ~0.3-0.5 ms per token). One
  thread doing 0.4 ms of Python per token slowed a 7.9 ms decode step by 0.55 ms (measured; see
  docs/serving.md). In its own process the step never waits for the HTTP side; events and
  commands cross two pipes (pickled, ~tens of µs per step). A crashed engine process fails its
  requests (500) and is started again; the server stays up.
* :class:`EngineWorker` runs it on a daemon thread of the server's process: one process, one copy
  of the weights, tests that reach into the engine; ~0.5 ms per token slower at low load.

A request the engine refuses gets one event with ``error`` set. If a step itself fails, every
request in that step gets an error event and the engine is rebuilt with an empty cache, so one
bad step cannot take the server down.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import queue
import signal
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

from mlakit.engine import Engine, EngineConfig, StreamEvent
from mlakit.errors import MlakitError
from mlakit.generate import SamplingConfig

logger = logging.getLogger(__name__)

#: ``finish_reason`` of a request failed by the server itself (a failed engine step), not by its input
INTERNAL_ERROR = "internal_error"


def internal_error(request_id: str, what: str) -> StreamEvent:
    """The last event of a request the server itself failed (a failed step, a dead engine process)."""
    return StreamEvent(request_id, None, finished=True, finish_reason=INTERNAL_ERROR, error=f"internal error: {what}")


#: a command to the engine loop: ("add", (request_id, prompt, sampling, stop_strings)), ("cancel", request_id)
Command = tuple[str, Any]


class Worker(Protocol):
    """What the HTTP layer needs of an engine loop (:class:`EngineWorker`, :class:`EngineProcess`)."""

    def start(self) -> None: ...

    def stop(self, timeout: float = 10.0) -> None: ...

    def submit(
        self, request_id: str, prompt: list[int], sampling: SamplingConfig, stop_strings: tuple[str, ...] = ()
    ) -> asyncio.Queue[StreamEvent]: ...

    def cancel(self, request_id: str) -> None: ...

    @property
    def num_pending(self) -> int: ...

    def stats(self) -> dict[str, int]: ...


class EngineCore:
    """The loop's body, transport-free: commands in, events out (the same in a thread or a process).

    Args:
        make_engine: builds the engine (called once, and again after a failed step).
    """

    def __init__(self, make_engine: Callable[[], Engine]) -> None:
        self._make_engine = make_engine
        self.engine = make_engine()
        self._live: set[str] = set()  # requests added and not finished

    def apply(self, command: Command) -> list[StreamEvent]:
        """Add or cancel a request; returns the refusal event of a request the engine will not take."""
        kind, arg = command
        if kind == "add":
            rid, prompt, sampling, stops = arg
            try:
                self.engine.add_request(prompt, sampling, stops, rid)
            except MlakitError as e:
                return [StreamEvent(rid, None, finished=True, finish_reason="error", error=str(e))]
            self._live.add(rid)
        elif kind == "cancel" and arg in self._live:
            self.engine.cancel(arg)  # frees its blocks now; its "cancelled" event comes with the next step
        return []

    def has_work(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> list[StreamEvent]:
        """One engine step's events; if the step fails, an error event for every live request and a new engine."""
        try:
            events = self.engine.step()
        except Exception as e:  # a failed step fails its requests, not the server
            logger.exception("engine step failed; failing its %d requests and resetting the cache", len(self._live))
            events = [internal_error(rid, str(e)) for rid in self._live]
            self._live.clear()
            self.engine = self._make_engine()
            return events
        for event in events:
            if event.finished:
                self._live.discard(event.request_id)
        return events

    def cancel_all(self) -> list[StreamEvent]:
        """Cancel every live request (shutdown): their "cancelled" events."""
        events = []
        for rid in list(self._live):
            self.engine.cancel(rid)
            events.append(StreamEvent(rid, None, finished=True, finish_reason="cancelled"))
        self._live.clear()
        return events


@dataclass
class _Pending:
    queue: asyncio.Queue[StreamEvent]
    loop: asyncio.AbstractEventLoop


class _Router:
    """The server side of either worker: each request's queue and loop, events handed to them."""

    def __init__(self) -> None:
        self._live: dict[str, _Pending] = {}
        self._lock = threading.Lock()

    def open(self, request_id: str) -> asyncio.Queue[StreamEvent]:
        q: asyncio.Queue[StreamEvent] = asyncio.Queue()
        with self._lock:
            self._live[request_id] = _Pending(q, asyncio.get_running_loop())
        return q

    def deliver(self, events: list[StreamEvent]) -> None:
        for event in events:
            with self._lock:
                target = self._live.pop(event.request_id, None) if event.finished else self._live.get(event.request_id)
            if target is not None:
                target.loop.call_soon_threadsafe(target.queue.put_nowait, event)

    def fail_all(self, what: str) -> None:
        """Fail every open request with :func:`internal_error`."""
        with self._lock:
            ids = list(self._live)
        self.deliver([internal_error(rid, what) for rid in ids])

    def __len__(self) -> int:
        with self._lock:
            return len(self._live)


class _Front:
    """What both workers do on the server's side: each request's queue, and commands posted to the loop."""

    def __init__(self) -> None:
        self._router = _Router()

    def _post(self, command: Command) -> None:
        raise NotImplementedError

    def submit(
        self, request_id: str, prompt: list[int], sampling: SamplingConfig, stop_strings: tuple[str, ...] = ()
    ) -> asyncio.Queue[StreamEvent]:
        """Queue a request; its events arrive on the returned queue (the last has ``finished``)."""
        q = self._router.open(request_id)
        self._post(("add", (request_id, prompt, sampling, stop_strings)))
        return q

    def cancel(self, request_id: str) -> None:
        """Stop a request (a client went away): its cache blocks are freed before the next step."""
        self._post(("cancel", request_id))

    @property
    def num_pending(self) -> int:
        """Requests accepted and not finished (running, waiting in the engine, or about to be added)."""
        return len(self._router)


class EngineWorker(_Front):
    """Owns ``engine`` and drives it from a daemon thread of this process.

    Args:
        make_engine: builds the engine (called once at start and again after a failed step).
    """

    def __init__(self, make_engine: Callable[[], Engine]) -> None:
        super().__init__()
        self._core = EngineCore(make_engine)
        self._commands: deque[Command] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="mlakit-engine", daemon=True)

    @property
    def engine(self) -> Engine:
        return self._core.engine

    # -- called from the event loop ------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything still running and stop the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)

    def _post(self, command: Command) -> None:
        with self._cond:
            self._commands.append(command)
            self._cond.notify()

    def stats(self) -> dict[str, int]:
        return self._core.engine.stats()

    # -- the loop thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._commands and not self._core.has_work():
                    self._cond.wait()
                if self._stop:
                    break
                commands = list(self._commands)
                self._commands.clear()
            for command in commands:
                self._router.deliver(self._core.apply(command))
            if self._core.has_work():
                self._router.deliver(self._core.step())
        self._router.deliver(self._core.cancel_all())


@dataclass(frozen=True)
class EngineSpec:
    """What the engine process loads: picklable, unlike the model (the child loads its own copy).

    Attributes:
        model: a resolved checkpoint directory (:func:`mlakit.engine.load.load_model` takes it).
        weights: the weight format (``auto``, ``fp32``, ``bf16``, ``int8``).
        config: the engine's configuration.
        threads: torch intra-op threads in the engine process (``None``: torch's default).
    """

    model: str
    weights: str = "auto"
    config: EngineConfig = field(default_factory=EngineConfig)
    threads: int | None = None


def _core_main(spec: EngineSpec, commands: Connection, events: Connection) -> None:
    """The engine process: load, report ``("ready", info)``, then loop until ``("stop", None)`` or EOF.

    Messages out: ``("events", [StreamEvent...], stats)`` after every step and command batch,
    ``("failed", message)`` if loading fails, ``("stopped", stats)`` last.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the server decides
    try:
        import torch

        from mlakit.engine.load import load_model

        if spec.threads:
            torch.set_num_threads(spec.threads)
        loaded = load_model(spec.model, weights=spec.weights)
        core = EngineCore(lambda: Engine(loaded.model, spec.config, tokenizer=loaded.tokenizer))
    except Exception as e:  # reported to the server, which raises it as one error
        events.send(("failed", f"{type(e).__name__}: {e}" if not isinstance(e, MlakitError) else str(e)))
        return
    cfg = loaded.model.config
    events.send(
        ("ready", {
            "capacity_tokens": core.engine.cache.capacity_tokens(), "weights": loaded.weights,
            "max_seq_len": cfg.max_seq_len, "eos_token_id": cfg.eos_token_id, "stats": core.engine.stats(),
        })
    )  # fmt: skip
    try:
        while True:
            if not core.has_work():
                batch = [commands.recv()]  # idle: block until something arrives
            else:
                batch = []
            while commands.poll():
                batch.append(commands.recv())
            out: list[StreamEvent] = []
            stop = False
            for command in batch:
                if command[0] == "stop":
                    stop = True
                    break
                out += core.apply(command)
            if stop:
                break
            if core.has_work():
                out += core.step()
            events.send(("events", out, core.engine.stats()))
        events.send(("events", core.cancel_all(), core.engine.stats()))
        events.send(("stopped", core.engine.stats()))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the server went away: nothing to report to


class EngineProcess(_Front):
    """Drives the engine in a child process (spawned: a fresh interpreter, its own OpenMP pool).

    The constructor starts the child and waits until it has loaded the model, so a checkpoint
    that does not load fails here, before the server binds its port. ``info`` holds what the
    child reported (``capacity_tokens``, ``weights``, ``max_seq_len``, ``eos_token_id``).

    The child is spawned (a fresh interpreter that re-imports ``__main__``), so a script that
    builds one must do it under ``if __name__ == "__main__":``, as with any spawn-based
    multiprocessing; ``mlakit serve`` does.

    Raises: MlakitError with the child's message if it cannot load the model.
    """

    def __init__(self, spec: EngineSpec, start_timeout: float = 600.0) -> None:
        self._spec = spec
        super().__init__()
        self._start_timeout = start_timeout
        self._outbox: queue.Queue[Command | None] = queue.Queue()
        self._stats: dict[str, int] = {}
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self.info = self._spawn()

    def _spawn(self) -> dict[str, Any]:
        ctx = multiprocessing.get_context("spawn")
        cmd_r, self._cmd_w = ctx.Pipe(duplex=False)
        self._ev_r, ev_w = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_core_main, args=(self._spec, cmd_r, ev_w), name="mlakit-engine", daemon=True)
        self._proc.start()
        cmd_r.close()
        ev_w.close()
        if not self._ev_r.poll(self._start_timeout):
            self._proc.kill()
            raise MlakitError(f"the engine process did not load {self._spec.model} in {self._start_timeout:.0f} s")
        try:
            kind, payload = self._ev_r.recv()
        except EOFError:
            self._proc.join(5)
            raise MlakitError(
                f"the engine process exited while loading {self._spec.model} (exit code {self._proc.exitcode})"
            ) from None
        if kind == "failed":
            self._proc.join(5)
            raise MlakitError(payload)
        self._stats = payload["stats"]
        return dict(payload)

    # -- called from the event loop ------------------------------------------------------------

    def start(self) -> None:
        for target, name in ((self._read, "mlakit-engine-events"), (self._send, "mlakit-engine-commands")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything still running, stop the child and the threads."""
        self._stopping = True
        self._outbox.put(("stop", None))
        self._outbox.put(None)
        for t in self._threads:
            t.join(timeout)
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout)

    def _post(self, command: Command) -> None:
        self._outbox.put(command)

    def stats(self) -> dict[str, int]:
        """The engine's counters as of its last message (it sends them after every step)."""
        return dict(self._stats)

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    # -- threads -------------------------------------------------------------------------------

    def _send(self) -> None:
        """Commands to the child, off the event loop (a large prompt may fill the pipe while it steps)."""
        while (command := self._outbox.get()) is not None:
            try:
                self._cmd_w.send(command)
            except (BrokenPipeError, OSError):
                if command[0] == "add":  # the child is gone (the reader restarts it): fail this request
                    self._router.deliver([internal_error(command[1][0], "the engine process died")])

    def _read(self) -> None:
        """Events from the child to the requests' queues; a dead child fails its requests and is restarted."""
        while True:
            try:
                message = self._ev_r.recv()
            except (EOFError, OSError):
                if self._stopping:
                    return
                self._restart()
                continue
            kind = message[0]
            if kind == "events":
                self._stats = message[2]
                self._router.deliver(message[1])
            elif kind == "stopped":
                self._stats = message[1]
                return

    def _restart(self) -> None:
        self._proc.join(5)
        code = self._proc.exitcode
        logger.error("the engine process died (exit code %s); failing its requests and starting a new one", code)
        self._router.fail_all(f"the engine process died (exit code {code})")
        while not self._stopping:
            try:
                self._spawn()
                return
            except MlakitError:
                logger.exception("could not restart the engine process; retrying")
