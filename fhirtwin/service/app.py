"""The ASGI application behind `fhirtwin serve`: one engine behind every front door.

Routers: the FHIR operation `$simulate` and the Subscription webhook (`operations`, `webhook`),
CDS Hooks (`cds_hooks`) and the SMART App Launch with its patient page (`smart`). Each router reads
the shared `ServiceSettings` from `request.app.state.settings`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from fhirtwin import __version__
from fhirtwin.service.runtime import ServiceSettings

__all__ = ["ServiceSettings", "create_app"]


def create_app(settings: ServiceSettings) -> FastAPI:
    """Build the application; routers are mounted from their own modules."""
    from fhirtwin.service import cds_hooks, operations, smart, webhook

    app = FastAPI(title="fhirtwin", version=__version__, docs_url="/docs", redoc_url=None)
    app.state.settings = settings

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "fhir_server": settings.fhir_server}

    for module in (operations, webhook, cds_hooks, smart):
        app.include_router(module.router)
    return app
