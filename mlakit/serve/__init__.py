"""``mlakit serve``: the engine behind an OpenAI-compatible HTTP API (FastAPI + uvicorn).

:func:`mlakit.serve.app.build_app` makes the app over an
:class:`~mlakit.serve.worker.EngineWorker` (the engine's loop on its own thread); the CLI in
:mod:`mlakit.cli.serve` wires a checkpoint to it. See docs/serving.md.
"""
