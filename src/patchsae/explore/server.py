"""The explorer's HTTP layer: a FastAPI app over :class:`Explorer` and one static page.

Every ``/api`` route is a thin call into ``Explorer``; an error about the input (an
:class:`ExploreError` or another patchsae ``ValueError``) becomes a 400 answer
``{"error": message}`` that the page shows, and the server keeps serving.
Routes are plain ``def`` functions, run in the server's thread pool: a slow image encode in one
session does not hold up clicks in another.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from tqdm import tqdm

from patchsae.cli import is_user_error
from patchsae.explore.core import ExploreError
from patchsae.explore.explorer import Explorer

MAX_UPLOAD_BYTES = 64 * 2**20


def _error(err: Exception) -> JSONResponse:
    if not is_user_error(err):
        raise err
    return JSONResponse({"error": str(err)}, status_code=400)


def _answer(call: Callable[[], Any]) -> Any:
    try:
        return call()
    except Exception as err:
        return _error(err)


def _png(call: Callable[[], bytes]) -> Response:
    try:
        return Response(call(), media_type="image/png", headers={"Cache-Control": "max-age=3600"})
    except Exception as err:
        return _error(err)


async def _read_upload(request: Request) -> bytes:
    """The raw request body, refused past ``MAX_UPLOAD_BYTES`` without reading the rest."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_UPLOAD_BYTES:
            raise ExploreError(
                f"the upload is larger than {MAX_UPLOAD_BYTES // 2**20} MB: use a smaller image"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(explorer: Explorer) -> FastAPI:
    """The web app: ``/`` (the page), ``/static/*`` and the JSON/PNG routes under ``/api``."""
    app = FastAPI(title="patchsae explorer", docs_url=None, redoc_url=None, openapi_url=None)
    static = resources.files("patchsae.explore") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    page = (static / "index.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    def index() -> str:
        return page

    @app.get("/api/info")
    def info() -> Any:
        return explorer.info()

    @app.post("/api/encode")
    async def encode(request: Request) -> Any:
        try:
            data = await _read_upload(request)
        except ExploreError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(_answer, lambda: explorer.encode(data))

    @app.get("/api/example/{index}")
    def example(index: int) -> Response:
        return _png(lambda: explorer.example_png(index))

    @app.get("/api/click")
    def click(session: str, x: float, y: float) -> Any:
        return _answer(lambda: explorer.click(session, x, y))

    @app.get("/api/latent/{latent}")
    def latent(latent: int, session: str | None = None, style: str = "heat") -> Any:
        return _answer(lambda: explorer.latent(latent, session or None, style))

    @app.get("/api/thumb/{model}/{dataset}/{latent}/{slot}")
    def thumb(model: str, dataset: str, latent: int, slot: int, mask: str | None = None) -> Any:
        return _png(lambda: explorer.thumb(model, dataset, latent, slot, mask))

    @app.get("/api/browse")
    def browse(
        kind: str, model: str | None = None, dataset: str | None = None, limit: int = 50
    ) -> Any:
        return _answer(lambda: explorer.browse(kind, model, dataset, limit))

    return app


def serve(explorer: Explorer, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    tqdm.write(f"patchsae explorer on http://{host}:{port}/ (Ctrl-C stops it)")
    uvicorn.run(create_app(explorer), host=host, port=port, log_level="warning")
