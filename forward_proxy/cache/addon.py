"""The cache addon: mitmproxy hooks that tie the pure cache parts together (being built, issue 3)."""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import ctx, exceptions

from forward_proxy.cache.config import OPTIONS, CacheConfig

logger = logging.getLogger(__name__)


class Cache:
    def __init__(self) -> None:
        self.config: CacheConfig | None = None

    def load(self, loader: Any) -> None:
        for option in OPTIONS:
            loader.add_option(option.name, option.type, option.default, option.help)

    def configure(self, updated: set[str]) -> None:
        try:
            self.config = CacheConfig.from_options(ctx.options)
        except ValueError as exc:
            raise exceptions.OptionsError(str(exc)) from None
