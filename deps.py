"""The routes' dependencies: the verified caller, the settings, and their `Annotated` aliases."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from config import Settings
from errors import Unauthorized
from jobs import JobService
from store import Store

# Clerk user ids are `user_<base62>`; the id becomes part of an object key, so allow no more.
_USER_ID = re.compile(r"^[A-Za-z0-9_\-]{1,128}$")


@dataclass(frozen=True, slots=True)
class Caller:
    """A verified user and the services their routes use.

    An exception to the template's habit (one accessor dependency per service, `StoreDep`,
    `JobsDep`, each overridable in tests): a route depends on this one, which reads the
    lifespan's services from `request.state` itself. FastAPI solves each dependency separately
    on every request (a sub-solve that also parses the query, headers and cookies), about
    20 µs each; bench/PROFILE.md measured `GET /jobs/{id}` at 495-511 µs of app CPU with one
    dependency per service and 413-443 µs with this one. Tests replace the state's services
    (tests/conftest.py `serve`), not the dependencies.
    """

    user_id: str
    store: Store
    jobs: JobService


# `async def`: FastAPI runs a plain `def` dependency in a worker thread, ~100 µs each.
async def current_user(request: Request) -> Caller:
    state = request.state
    principal = await state.auth.authenticate(request)
    if not _USER_ID.fullmatch(principal.user_id):
        raise Unauthorized("The token's subject is not a valid user id")
    return Caller(principal.user_id, state.store, state.jobs)


async def app_settings(request: Request) -> Settings:
    """The settings this app was built with (create_app keeps them on `app.state`)."""
    settings: Settings = request.app.state.settings
    return settings


CurrentUser = Annotated[Caller, Depends(current_user)]
SettingsDep = Annotated[Settings, Depends(app_settings)]
