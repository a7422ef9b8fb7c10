# The safety-monitor worker (docker-compose.yml builds it; see the README's
# "Production stack"). Settings come from MONITOR_* environment variables.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY monitor ./monitor
RUN pip install ".[rocksdb]"

# the trials' rules (docker-compose.yml mounts ./rules over them) and the sample log
COPY rules ./rules
COPY examples ./examples

RUN useradd --system --uid 10001 --create-home --home-dir /var/lib/safety-monitor monitor
USER monitor

ENV MONITOR_RULES_DIR=/app/rules \
    MONITOR_STATE_DIR=/var/lib/safety-monitor/state \
    MONITOR_WEB_HOST=0.0.0.0 \
    MONITOR_WEB_PORT=6066
EXPOSE 6066

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=4 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('MONITOR_WEB_PORT', '6066'), timeout=4)"]

CMD ["safety-monitor", "worker"]
