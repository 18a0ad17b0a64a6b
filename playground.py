"""`/`: the playground page in local mode (and its dev-token endpoint), a docs pointer otherwise.

The page is one static file, `static/playground.html`: no build step, nothing from another host
(the same Content-Security-Policy as /docs). It calls the public API like any web app would,
with the token in an `Authorization` header, and follows jobs over fetch-based SSE.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse
from pydantic import Field

from auth import mint_dev_token
from config import Settings
from errors import InvalidRequest
from models import ApiModel
from openapi import DOCS_CSP

PAGE = Path(__file__).resolve().parent / "static" / "playground.html"
# The ids `deps.current_user` accepts, so a minted token is always usable.
_USER_ID = re.compile(r"[A-Za-z0-9_\-]{1,128}")
# A page session: long enough for a demo, short enough that a copied token soon expires.
DEV_TOKEN_SECONDS = 3600

page_router = APIRouter(include_in_schema=False)
dev_token_router = APIRouter(include_in_schema=False)
docs_pointer_router = APIRouter(include_in_schema=False)


class DevTokenRequest(ApiModel):
    user_id: str = Field(max_length=128)


class DevTokenResponse(ApiModel):
    token: str
    expires_in: int


@page_router.get("/")
async def playground() -> FileResponse:
    """The playground page."""
    return FileResponse(PAGE, headers={"Content-Security-Policy": DOCS_CSP})


@dev_token_router.post("/_local/token")
async def dev_token(body: DevTokenRequest, request: Request) -> DevTokenResponse:
    """A dev session token for any user: the local issuer's, so local mode only."""
    if not _USER_ID.fullmatch(body.user_id):
        raise InvalidRequest("userId: letters, digits, '_' and '-' only, 1 to 128 of them")
    data_dir = request.app.state.settings.local_data_dir
    token = mint_dev_token(data_dir, body.user_id, ttl_seconds=DEV_TOKEN_SECONDS)
    return DevTokenResponse(token=token, expires_in=DEV_TOKEN_SECONDS)


@docs_pointer_router.get("/")
async def docs_pointer() -> dict[str, str]:
    """Where the API is described: production serves no playground."""
    return {
        "service": "CineWeave API gateway",
        "docs": "/docs",
        "redoc": "/redoc",
        "openapi": "/openapi.json",
    }


def install_playground(app: FastAPI, settings: Settings) -> None:
    """The page and its token endpoint in local mode; the docs pointer in production."""
    if settings.is_production:
        app.include_router(docs_pointer_router)
        return
    app.include_router(page_router)
    if not settings.uses_real_clerk:  # only the local dev issuer can mint a token here
        app.include_router(dev_token_router)
