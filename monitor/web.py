"""The worker's web port: GET /status, /metrics, /healthz and /readyz (SPEC section 8)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson


def add_routes(app: Any, pipeline: Any, metrics: Any = None) -> None:
    from .stream import is_ready

    @app.page("/status")
    async def status(web: Any, request: Any) -> Any:
        now = dt.datetime.now(dt.UTC)
        body = orjson.dumps(pipeline.status(now), option=orjson.OPT_NON_STR_KEYS)
        return web.bytes(body, content_type="application/json")

    @app.page("/healthz")
    async def healthz(web: Any, request: Any) -> Any:
        return web.json({"ok": True})

    @app.page("/readyz")
    async def readyz(web: Any, request: Any) -> Any:
        ready = is_ready(app) and pipeline.loaded
        return web.json({"ready": ready, "trials": len(pipeline.trials.trials)},
                        status=200 if ready else 503)

    @app.page("/metrics")
    async def metrics_page(web: Any, request: Any) -> Any:
        if metrics is None:
            return web.text("", content_type="text/plain; version=0.0.4")
        body, content_type = metrics.exposition()
        return web.bytes(body, content_type=content_type.split(";")[0])
