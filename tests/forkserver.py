"""Run ``mlakit`` commands as forked processes of one warm interpreter, so a test can SIGKILL many of them.

Starting a Python that imports torch and transformers takes seconds; a crash test needs dozens of
runs per command. This server imports everything once, then forks one child per command: the child
is an ordinary process running :func:`mlakit.cli.main` (its own pid, killed by a real SIGKILL), and
it starts in milliseconds. Nothing has run a parallel torch region in the server before it forks
(one intra-op thread), so the children cannot inherit a broken thread pool.

Protocol, one JSON object per line on stdin/stdout::

    {"run": [argv...], "cwd": DIR, "log": FILE, "env": {...}}  ->  {"pid": PID}
    {"wait": PID}                                              ->  {"status": exit code, or -signal}

Usage: ``python tests/forkserver.py`` (from the repository root).
"""

from __future__ import annotations

import json
import os
import sys


def _warm() -> None:
    import torch

    torch.set_num_threads(1)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    import mlakit.cli
    import mlakit.convert
    import mlakit.eval.run
    import mlakit.interop
    import mlakit.train.distill
    import mlakit.train.trainer

    mlakit.cli.build_parser()  # imports every command module


def _child(request: dict) -> None:
    os.environ.update(request.get("env", {}))
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(request.get("cwd", "."))
    code = 1
    try:
        from mlakit.cli import main

        code = main(request["run"])
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _warm()
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if "run" in request:
            pid = os.fork()
            if pid == 0:
                _child(request)
            reply: dict = {"pid": pid}
        else:
            _, status = os.waitpid(request["wait"], 0)
            reply = {"status": os.waitstatus_to_exitcode(status)}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    serve()
