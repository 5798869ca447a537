"""The ASGI application behind `fhirtwin serve`: one engine behind every front door.

Routers: the FHIR operation `$simulate` and the Subscription webhook (`operations`, `webhook`),
CDS Hooks (`cds_hooks`) and the SMART App Launch with its patient page (`smart`). Each router reads
the shared `ServiceSettings` from `request.app.state.settings`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from fastapi import FastAPI

from fhirtwin import __version__

log = logging.getLogger("fhirtwin.service")


@dataclass(frozen=True)
class ServiceSettings:
    """Where the service finds its FHIR server and how it presents itself."""

    fhir_server: str
    public_url: str = "http://127.0.0.1:8765"
    verify_tls: bool = True
    draws: int = 1000
    horizon_years: float = 10.0
    signing_key_file: str | None = None
    extra: dict = field(default_factory=dict)


def create_app(settings: ServiceSettings) -> FastAPI:
    """Build the application; routers are mounted from their own modules."""
    from fhirtwin.service import cds_hooks, operations, smart, webhook

    app = FastAPI(title="fhirtwin", version=__version__, docs_url="/docs", redoc_url=None)
    app.state.settings = settings

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "version": __version__, "fhir_server": settings.fhir_server}

    for module in (operations, webhook, cds_hooks, smart):
        app.include_router(module.router)
    return app
