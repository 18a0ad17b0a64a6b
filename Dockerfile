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
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app gateway
WORKDIR /app
COPY --from=build /venv /venv
COPY *.py ./
# The worker contract's schema (pydantic only): jobs.py builds each RunPod input through it.
COPY worker/__init__.py worker/contract.py ./worker/
# Compiled once here: the non-root user cannot write __pycache__ (nor should it), so otherwise
# every cold start would compile every module again, about 30 ms measured.
RUN python -m compileall -q /app
# Numeric, so a runtime that forbids root can tell without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080
# `exec` makes uvicorn PID 1, so Cloud Run's SIGTERM reaches it and the lifespan's shutdown runs.
# uvicorn's access log would print query strings (webhook tokens): the gateway logs its own.
# Cloud Run sends SIGKILL 10 s after SIGTERM: requests in flight get 8 s to finish, which
# leaves time to close the clients. tests/test_shutdown.py runs this exact line.
CMD ["sh", "-c", "exec uvicorn main:app --host 0.0.0.0 --port ${PORT:-8080} --proxy-headers --forwarded-allow-ips='*' --no-access-log --timeout-graceful-shutdown 8"]
