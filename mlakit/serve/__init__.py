"""``mlakit serve``: the engine behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

:func:`mlakit.serve.app.build_app` makes the app over a :class:`~mlakit.serve.worker.Worker`: an
:class:`~mlakit.serve.worker.EngineProcess` (the engine's loop in its own process, the CLI's
default) or an :class:`~mlakit.serve.worker.EngineWorker` (on a thread); the CLI in
:mod:`mlakit.cli.serve` wires a checkpoint to it. See docs/serving.md.
"""
