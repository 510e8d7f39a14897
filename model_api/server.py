"""`model-api serve`: load the models, then run the application under uvicorn until stopped."""

from __future__ import annotations

import logging
import sys

import uvicorn

from model_api.app import create_app
from model_api.models.registry import load_registry
from model_api.settings import Settings

logger = logging.getLogger(__name__)


def configure_logging(level: str) -> None:
    """Plain lines for events; request lines are JSON already and printed as they are."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package = logging.getLogger("model_api")
    package.handlers[:] = [handler]
    package.setLevel(level.upper())
    package.propagate = False
    request_handler = logging.StreamHandler(sys.stderr)
    request_handler.setFormatter(logging.Formatter("%(message)s"))
    requests = logging.getLogger("model_api.requests")
    requests.handlers[:] = [request_handler]
    requests.propagate = False


def serve(settings: Settings) -> None:
    configure_logging(settings.log_level)
    registry = load_registry(settings)
    app = create_app(settings, registry)
    logger.info(
        "deployment version %s; listening on http://%s:%d", registry.version, settings.host, settings.port
    )
    # uvicorn's access log prints client addresses; the middleware writes our own line instead.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        access_log=False,
        log_level=settings.log_level,
        timeout_graceful_shutdown=10,
    )
