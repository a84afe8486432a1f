"""Timed sections that take turns: every system of a comparison in its own process, one at a time.

This machine is shared (a VM whose host is busy or idle at different times): the same decode step
measured 51 ms at one moment of a session and 70 ms twenty minutes later. Systems timed one after
another, minutes apart, compare moments, not systems. Here all workers start together and stop at
each timed section (a *gate*); the orchestrator lets one worker run its section, waits until it is
at its next gate, then lets the next one run, rotating who goes first from round to round. Each
timed section therefore runs alone on the machine, and a section repeated over ``R`` rounds puts
every system's ``R`` timings side by side, seconds apart.

Worker side (any interpreter; this file imports nothing but the standard library)::

    gate("decode 16 x 4096, round 0", enabled)    # prints {"gate": ...}, waits for a line on stdin

Orchestrator side::

    results = take_turns({"llama.cpp": cmd_a, "mlakit": cmd_b}, env)   # name -> the worker's last JSON line
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable


def gate(label: str, enabled: bool) -> None:
    """Stop here until the orchestrator says go (a no-op when the worker runs alone)."""
    if not enabled:
        return
    print(json.dumps({"gate": label}), flush=True)
    if sys.stdin.readline() == "":
        raise SystemExit("the benchmark orchestrator went away")


def timed_point(batch: int, context: int, rounds: int, gated: bool, run: Callable[[], float]) -> dict:
    """One decode point timed ``rounds`` times, each behind a gate; ``run()`` returns tokens/s.

    Returns ``{batch, context, tokens_per_s (the best round), rounds (every round), step_ms}``.
    """
    measured = []
    for r in range(rounds):
        gate(f"decode {batch} x {context}, round {r}", gated)
        measured.append(run())
    best = max(measured)
    return {"batch": batch, "context": context, "tokens_per_s": best, "rounds": measured, "step_ms": batch / best * 1e3}


def take_turns(commands: dict[str, list[str]], env: dict[str, str], log=None) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    """Run the workers side by side, one timed section at a time; each worker's final JSON object.

    ``commands[name]`` must make its worker call :func:`gate` before each timed section and print
    one JSON object as its last line. Raises SystemExit naming a worker that fails.
    """
    errs = {name: tempfile.TemporaryFile(mode="w+") for name in commands}
    procs = {
        name: subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errs[name], text=True, env=env, bufsize=1
        )
        for name, cmd in commands.items()
    }

    def next_line(name: str) -> dict:
        """The worker's next JSON line: a gate or its result."""
        p = procs[name]
        assert p.stdout is not None
        for line in p.stdout:
            line = line.strip()
            if line.startswith("{"):
                return json.loads(line)
        p.wait()
        errs[name].seek(0)
        raise SystemExit(f"benchmark worker {name} failed (exit {p.returncode}): {errs[name].read()[-3000:]}")

    try:
        state = {name: next_line(name) for name in procs}  # all start together; each stops at its first gate
        order = list(procs)
        rnd = 0
        while any("gate" in s for s in state.values()):
            k = rnd % len(order)
            for name in order[k:] + order[:k]:
                if "gate" not in state[name]:
                    continue
                if log is not None:
                    print(f"  {name}: {state[name]['gate']}", file=log, flush=True)
                stdin = procs[name].stdin
                assert stdin is not None
                stdin.write("\n")
                stdin.flush()
                state[name] = next_line(name)  # its section has run; it waits at its next gate (or is done)
            rnd += 1
        for p in procs.values():
            p.wait()
        return state
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        for f in errs.values():
            f.close()
