"""The ASGI application behind `fhirtwin serve`: one engine behind every front door.

Routers: the FHIR operation `$simulate` and the Subscription webhook (`operations`, `webhook`),
CDS Hooks (`cds_hooks`) and the SMART App Launch with its patient page (`smart`). Each router reads
the shared `ServiceSettings` from `request.app.state.settings`.

`/model-card` is public like `/health`: it holds no patient data (the HTI-1 source attributes of a model
version, the link in every CDS card). JSON by default, HTML for browsers, the Markdown card on request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from fhirtwin import __version__
from fhirtwin.service.runtime import AuditFlusher, ServiceSettings
from fhirtwin.service.security import guard_for

__all__ = ["ServiceSettings", "create_app", "preferred_media_type"]

#: What `/model-card` can answer, in the order used when the client has no preference.
MODEL_CARD_TYPES = ("application/json", "text/html", "text/markdown", "text/plain")


def preferred_media_type(accept: str | None, offered: tuple[str, ...] = MODEL_CARD_TYPES) -> str | None:
    """The offered type the ``Accept`` header prefers (highest q, then header order); None if none is
    acceptable. No header, or ``*/*``, gives the first offered type."""
    if not accept or not accept.strip():
        return offered[0]
    best: tuple[float, int, str] | None = None
    for position, part in enumerate(accept.split(",")):
        fields = [f.strip() for f in part.split(";")]
        media = fields[0].lower()
        q = 1.0
        for param in fields[1:]:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q <= 0:
            continue
        if media in ("*/*", "*"):
            candidates = [offered[0]]
        elif media.endswith("/*"):
            candidates = [o for o in offered if o.startswith(media[:-1])][:1]
        else:
            candidates = [o for o in offered if o == media]
        for candidate in candidates:
            if best is None or (q, -position) > (best[0], -best[1]):
                best = (q, position, candidate)
    return best[2] if best else None


class _StoredReplayCache:
    """JWT ids remembered in the service's store, opened on first use (so that several service processes
    sharing the store refuse a token replayed to any of them)."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings

    def seen_jti(self, issuer: str, jti: str, expires_at: float) -> bool:
        from fhirtwin.service.store import open_store

        return open_store(self.settings).seen_jti(issuer, jti, expires_at)


def create_app(settings: ServiceSettings) -> FastAPI:
    """Build the application; routers are mounted from their own modules."""
    from fhirtwin.hybrid.artifact import configured_artifact
    from fhirtwin.service import cds_hooks, limits, operations, smart, webhook
    from fhirtwin.sim.components import enabled_components

    # the model configuration every door's engine reads: a bad FHIRTWIN_COMPONENTS or learned-residual
    # artifact stops the service here, with its typed error, instead of failing every request
    enabled_components()
    configured_artifact()
    flusher = AuditFlusher(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        """Audit events reach the FHIR server from the store's outbox on their own thread."""
        flusher.start()
        yield
        from starlette.concurrency import run_in_threadpool

        await run_in_threadpool(flusher.stop)

    # the interactive API docs describe every door: only for development, like the open doors themselves
    docs = "/docs" if settings.dev_no_auth else None
    app = FastAPI(title="fhirtwin", version=__version__, docs_url=docs, redoc_url=None, lifespan=lifespan,
                  openapi_url="/openapi.json" if docs else None)
    app.state.settings = settings
    app.state.guard = guard_for(settings, replay=_StoredReplayCache(settings))

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    @app.get("/model-card", response_model=None)
    def model_card(request: Request, model: str | None = Query(default=None)) -> Response:
        """The model card of a model version (default: the mechanistic twin): JSON, HTML or Markdown."""
        from fhirtwin.model_card import model_card as assemble
        from fhirtwin.model_card import render_html
        from fhirtwin.package_data import model_card_markdown

        media = preferred_media_type(request.headers.get("accept"))
        if media is None:
            return JSONResponse({"error": "not_acceptable", "message": "offered: " + ", ".join(MODEL_CARD_TYPES)},
                                status_code=406)
        if media in ("text/markdown", "text/plain"):
            return PlainTextResponse(model_card_markdown(), media_type=f"{media}; charset=utf-8",
                                     headers={"Vary": "Accept"})
        try:
            card = assemble(model)
        except KeyError as exc:
            return JSONResponse({"error": "not_found", "message": str(exc.args[0])}, status_code=404)
        if media == "text/html":
            return HTMLResponse(render_html(card), headers={"Vary": "Accept"})
        return JSONResponse(card, headers={"Vary": "Accept"})

    for module in (operations, webhook, cds_hooks, smart):
        app.include_router(module.router)
    limits.install(app)  # last: body limits and typed errors outermost
    return app
