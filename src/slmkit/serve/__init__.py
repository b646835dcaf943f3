"""OpenAI-compatible server: ``slm serve MODEL`` or ``slmkit.serve.serve(lm)``."""

from __future__ import annotations

import signal
import sys
import threading

# How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). The engine drops the
# GIL inside every kernel and must take it back between them; with the HTTP thread holding it, each take-back
# could wait out a whole interval, which cost a streamed token ~2 ms here (0.82x the in-process rate; 0.2 ms:
# 0.97-1.04x; docs/serving.md).
GIL_SWITCH_INTERVAL = 0.0002


def serve(lm, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, max_batch: int = 32,
          max_queue: int = 256, model_id: str | None = None) -> None:
    """Serve ``lm`` until interrupted (Ctrl-C or SIGTERM).

    The engine runs on this thread, the one that loaded the model, and HTTP on a second one: model work on a
    new thread would start a second OpenMP pool and slow every decode step (see ``engine.batcher.Batcher``).
    While serving, the GIL changes hands every ``GIL_SWITCH_INTERVAL`` seconds instead of every 5 ms.
    """
    import uvicorn

    from ..errors import SlmError
    from .app import create_app

    app = create_app(lm, model_id=model_id, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                     engine_thread=False)
    batcher = app.state.server.batcher
    http = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))

    def run_http():
        try:
            http.run()
        finally:  # a port that cannot be bound, or the shutdown: the engine stops with it
            batcher.stop()

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    name = app.state.server.model_id
    print(f"slm serve: '{name}' on http://{host}:{port}/v1 (max batch {max_batch}, queue {max_queue}"
          f"{', API key required' if api_key else ''}); chat page: http://{host}:{port}/",
          file=sys.stderr, flush=True)
    previous = signal.signal(signal.SIGTERM, interrupt)
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    thread = threading.Thread(target=run_http, name="slmkit-http", daemon=True)
    thread.start()
    interrupted = False
    try:
        try:
            batcher.run()
        except KeyboardInterrupt:  # stop listening; answer the open requests, then the HTTP thread stops us
            interrupted = http.should_exit = True
            batcher.run()
    except KeyboardInterrupt:  # a second interrupt: leave now
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        sys.setswitchinterval(switch_interval)
        http.should_exit = True
        thread.join(timeout=30)
    if not http.started and not interrupted:
        raise SlmError(f"could not listen on {host}:{port} (is the port in use?)")
