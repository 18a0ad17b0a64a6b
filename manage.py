"""Operator commands: mint a dev token, grant credits, show a user, audit the ledger.

    python manage.py mint-token user_alice
    python manage.py grant user_alice 50 --reason "support ticket 123"
    python manage.py show user_alice
    python manage.py audit

They use the same settings (`.env`, environment) and the same store as the gateway.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from auth import mint_dev_token
from config import Settings, settings_or_exit
from models import JobResponse
from store import Store
from wiring import build_store


def _store(settings: Settings) -> Store:
    store, _ = build_store(settings)
    return store


def mint_token(args: argparse.Namespace, settings: Settings) -> int:
    if settings.uses_real_clerk:
        print("Clerk is configured: tokens come from Clerk, not from here.", file=sys.stderr)
        return 2
    print(mint_dev_token(settings.local_data_dir, args.user_id, ttl_seconds=args.ttl))
    return 0


async def _grant(settings: Settings, user_id: str, amount: int, reason: str) -> int:
    store = _store(settings)
    try:
        user = await store.grant_credits(user_id, amount, reason)
    finally:
        await store.close()
    print(f"{user.user_id}: {user.credits} credits ({user.plan})")
    return 0


def grant(args: argparse.Namespace, settings: Settings) -> int:
    if args.amount <= 0:
        print("amount must be a positive whole number", file=sys.stderr)
        return 2
    return asyncio.run(_grant(settings, args.user_id, args.amount, args.reason))


async def _show(settings: Settings, user_id: str, limit: int) -> int:
    store = _store(settings)
    try:
        # Looking must not create: an unknown id would otherwise get the signup credits.
        user = await store.find_user(user_id)
        page = await store.list_jobs(user_id, limit, None)
    finally:
        await store.close()
    if user is None:
        print(f"{user_id}: no such user", file=sys.stderr)
        return 1
    print(f"{user.user_id}: {user.credits} credits ({user.plan})")
    for job in page.jobs:
        view = JobResponse.from_job(job)
        runpod = job.runpod_id or "-"
        print(
            f"  {view.job_id}  {view.status.value:9} {view.cost:>4} credits"
            f"  {view.created_at}  runpod={runpod}"
        )
    return 0


def show(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_show(settings, args.user_id, args.limit))


async def _audit(settings: Settings) -> int:
    store = _store(settings)
    try:
        problems = await store.audit()
        users = len(await store.ledger_totals())
    finally:
        await store.close()
    for problem in problems:
        print(problem)
    print(f"audit: {users} users, {len(problems)} problems")
    return 1 if problems else 0


def audit(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_audit(settings))


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="manage.py", description=__doc__.split("\n")[0])
    commands = root.add_subparsers(dest="command", required=True)

    mint = commands.add_parser("mint-token", help="mint a dev session token (local mode only)")
    mint.add_argument("user_id", help="the user id to put in the token's `sub`, e.g. user_alice")
    mint.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    mint.set_defaults(handler=mint_token)

    give = commands.add_parser("grant", help="grant credits to a user")
    give.add_argument("user_id")
    give.add_argument("amount", type=int, help="credits to add")
    give.add_argument("--reason", default="operator grant", help="recorded in the ledger")
    give.set_defaults(handler=grant)

    view = commands.add_parser("show", help="show a user's balance and latest jobs")
    view.add_argument("user_id")
    view.add_argument("--limit", type=int, default=20, help="how many jobs (default 20)")
    view.set_defaults(handler=show)

    check = commands.add_parser(
        "audit",
        help="check that every balance equals grants - charges + refunds and that every"
        " failed or canceled job was refunded exactly once (exit 1 on any problem)",
    )
    check.set_defaults(handler=audit)
    return root


def run(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.handler(args, settings_or_exit()))


if __name__ == "__main__":
    sys.exit(run())
