"""The chat page at ``/`` (one self-contained HTML file, ``static/chat.html``) and ``/v1/model_info``.

The page itself loads without an API key (it holds no data); it sends the key the user types in as
``Authorization: Bearer`` to the API, which checks it as for any other client.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PUBLIC_PATHS = ("/health", "/")  # served without an API key


def chat_html() -> str:
    return (resources.files(__package__) / "static" / "chat.html").read_text(encoding="utf-8")


def add_chat_page(app: FastAPI, server) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def chat_page():
        return HTMLResponse(chat_html(), headers={"Cache-Control": "no-cache"})

    @app.get("/v1/model_info")
    async def model_info():
        """What ``slm info`` says about the served model (architecture, size, quantization, tokenizer)."""
        info = server.lm.info() if hasattr(server.lm, "info") else {}
        return {"id": server.model_id, **info}
