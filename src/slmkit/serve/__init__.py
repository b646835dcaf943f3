"""OpenAI-compatible server: ``slm serve MODEL`` or ``slmkit.serve.serve(lm)``."""

from __future__ import annotations

import sys


def serve(lm, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 32,
          max_queue: int = 256, model_id: str | None = None) -> None:
    """Serve ``lm`` until interrupted (uvicorn, one process, one engine thread)."""
    import uvicorn

    from .app import create_app

    app = create_app(lm, model_id=model_id, api_key=api_key, max_batch=max_batch, max_queue=max_queue)
    name = app.state.server.model_id
    print(f"slm serve: '{name}' on http://{host}:{port}/v1 (max batch {max_batch}, queue {max_queue}"
          f"{', API key required' if api_key else ''})", file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
