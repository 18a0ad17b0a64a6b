# syntax=docker/dockerfile:1
# Production image: requirements.txt only (no test tools, no video encoder), run as non-root.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /build
COPY requirements.txt .
RUN python -m venv /venv && /venv/bin/pip install --no-cache-dir -r requirements.txt

FROM python:3.11-slim
ENV PATH="/venv/bin:$PATH" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    GATEWAY_ENV=production \
    PORT=8080
RUN useradd --system --uid 10001 --home-dir /app gateway
WORKDIR /app
COPY --from=build /venv /venv
COPY *.py ./
USER gateway
EXPOSE 8080
# `exec` makes uvicorn PID 1, so Cloud Run's SIGTERM reaches it and the lifespan's shutdown runs.
# uvicorn's access log would print query strings (webhook tokens): the gateway logs its own.
CMD ["sh", "-c", "exec uvicorn main:app --host 0.0.0.0 --port ${PORT:-8080} --proxy-headers --forwarded-allow-ips='*' --no-access-log"]
