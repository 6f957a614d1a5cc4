"""The browser playground: `/` serves server/static/index.html, `/static/*` its script and styles.

The page is plain HTML/JS/CSS (no build step, nothing fetched from outside the server) and talks
to the public API only (/v1/models, /v1/chat/completions, /metrics), with the key the user types
when the API answers 401: it can show nothing the API would not give any client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"

# The page may load its own files and call its own origin, nothing else: no CDN, no inline
# script, and a stray URL in a model's reply (rendered as text anyway) cannot fetch from elsewhere.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def install(app: FastAPI) -> None:
    """Serve the playground on `app` (`/` and `/static/*`); left out, both stay 404."""
    index = STATIC_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(index, media_type="text/html; charset=utf-8", headers=_HEADERS)

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
