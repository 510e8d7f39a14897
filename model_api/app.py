"""The FastAPI application: both protocols, `/stats`, the error shape and the per-request middleware."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from model_api import __version__
from model_api.errors import install_error_handlers
from model_api.middleware import RequestMiddleware
from model_api.models.registry import Registry
from model_api.protocols.chat import chat_router
from model_api.protocols.kserve import kserve_router
from model_api.protocols.openai import openai_router
from model_api.settings import Settings


def create_app(settings: Settings, registry: Registry) -> FastAPI:
    """An application serving the already loaded `registry`; it closes the batchers on shutdown."""
    started = time.time()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await registry.close()

    app = FastAPI(
        title="model-api",
        version=__version__,
        description="Embeddings (OpenAI API) and tensor models (KServe v2) with dynamic batching.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.include_router(openai_router(registry, settings))
    app.include_router(kserve_router(registry, settings))
    app.include_router(chat_router(registry, settings))

    @app.get("/stats", tags=["Operations"])
    async def stats() -> dict[str, Any]:
        """What each model computed since the server started."""
        return {
            "version": registry.version,
            "uptime_s": round(time.time() - started, 3),
            "batching": settings.batching,
            "max_batch_size": settings.max_batch_size,
            "max_batch_delay_ms": settings.max_batch_delay_ms,
            "models": {name: served.stats.as_dict() for name, served in registry.models.items()},
            "chat_models": {name: engine.stats.as_dict() for name, engine in registry.chat_models.items()},
        }

    app.add_middleware(RequestMiddleware, version=registry.version, settings=settings)
    return app
