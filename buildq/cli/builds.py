"""Builds from the command line: submit, list, show, watch, cancel."""

from __future__ import annotations

import argparse
import secrets
import time
from typing import Any

from buildq.buildrunner import BuildStatus, Change
from buildq.cli import argtypes, common
from buildq.cli.output import print_table
from buildq.orchestrator import topics
from buildq.orchestrator.model import Build, BuildRequest, request_message
from buildq.orchestrator.sqlstore import SqlBuildStore
from buildq.queue.sql import SqlQueue
from buildq.storage.database import Database

STATUSES = [s.value for s in BuildStatus]


def register(commands: Any) -> None:
    submit = commands.add_parser("submit", help="ask for a build of base + head changes")
    common.add_target_options(submit)
    submit.add_argument(
        "--queue", required=True, help="build queue (a [queues.NAME] in the config)"
    )
    submit.add_argument(
        "--head",
        action="append",
        required=True,
        metavar="ID[@REV]",
        help="change under test (repeat, in order)",
    )
    submit.add_argument(
        "--base",
        action="append",
        default=[],
        metavar="ID[@REV]",
        help="change assumed good (repeat, in order)",
    )
    submit.add_argument(
        "--meta", action="append", default=[], metavar="K=V", help="caller metadata (repeat)"
    )
    submit.add_argument("--request-id", help="idempotency key (default: random)")
    submit.add_argument(
        "--wait", action="store_true", help="follow the build; exit 0 if it succeeds, 1 if not"
    )
    submit.add_argument(
        "--timeout",
        type=argtypes.seconds(0, 30 * 86_400),
        default=0,
        help="with --wait: give up after this many seconds (default 0: never)",
    )
    common.add_json_option(submit)
    submit.set_defaults(handler=_submit)

    builds = commands.add_parser("builds", help="list and show builds")
    sub = builds.add_subparsers(dest="builds_command", metavar="ACTION", required=True)
    ls = sub.add_parser("ls", help="list builds, newest first")
    common.add_target_options(ls)
    ls.add_argument("--status", action="append", choices=STATUSES, help="only these statuses")
    ls.add_argument("--queue", help="only this queue")
    ls.add_argument(
        "--limit", type=argtypes.positive_int, default=50, help="at most N (default 50)"
    )
    common.add_json_option(ls)
    ls.set_defaults(handler=_ls)
    show = sub.add_parser("show", help="one build, by build id or request id")
    common.add_target_options(show)
    show.add_argument("id")
    common.add_json_option(show)
    show.set_defaults(handler=_show)

    watch = commands.add_parser("watch", help="live view of in-flight builds")
    common.add_target_options(watch)
    watch.add_argument(
        "--interval",
        type=argtypes.seconds(0.1, 3600),
        default=1.0,
        help="refresh every N seconds",
    )
    watch.add_argument("--once", action="store_true", help="print one view and exit")
    watch.set_defaults(handler=_watch)

    cancel = commands.add_parser("cancel", help="cancel a build (the poll loop tells the runner)")
    common.add_target_options(cancel)
    cancel.add_argument("id", help="build id or request id")
    cancel.set_defaults(handler=_cancel)


def _parse_meta(items: list[str]) -> dict[str, str]:
    meta = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise common.CliError(f"--meta {item!r}: expected KEY=VALUE")
        meta[key] = value
    return meta


def _parse_changes(specs: list[str], flag: str) -> tuple[Change, ...]:
    try:
        return tuple(Change.parse(spec) for spec in specs)
    except ValueError as err:
        raise common.CliError(f"{flag}: {err}") from None


def _submit(args: argparse.Namespace) -> int:
    if args.request_id == "":
        raise common.CliError("--request-id must not be empty (leave it out for a random one)")
    request = BuildRequest(
        request_id=args.request_id or f"req-{secrets.token_hex(8)}",
        queue=args.queue,
        base=_parse_changes(args.base, "--base"),
        head=_parse_changes(args.head, "--head"),
        metadata=_parse_meta(args.meta),
    )
    try:
        BuildRequest.from_bytes(request.to_bytes())  # the daemon's own validation, up front
    except ValueError as err:
        raise common.CliError(str(err)) from None
    config = common.load(args) if not args.url else None
    if config is not None and request.queue not in config.queues:
        known = ", ".join(sorted(config.queues)) or "none"
        raise common.CliError(f"unknown queue {request.queue!r} (configured: {known})")
    return common.run_db(args, lambda db: _publish_and_follow(db, request, args))


def _publish_and_follow(db: Database, request: BuildRequest, args: argparse.Namespace) -> int:
    result = SqlQueue(db).publish(topics.BUILD, request_message(request))
    if args.json and not args.wait:
        common.print_json({"request_id": request.request_id, "duplicate": result.duplicate})
    elif not args.wait:
        print(
            f"request {request.request_id} submitted"
            + (" (already submitted)" if result.duplicate else "")
        )
    if not args.wait:
        return 0
    return _follow(SqlBuildStore(db), request.request_id, args)


def _follow(store: SqlBuildStore, request_id: str, args: argparse.Namespace) -> int:
    deadline = time.monotonic() + args.timeout if args.timeout else None
    last = None
    while True:
        build = store.get_by_request(request_id)
        if build is not None and (build.status, build.build_id) != last:
            last = (build.status, build.build_id)
            if not args.json:
                print(f"{request_id} {build.build_id or '-'} {build.status}", flush=True)
        if build is not None and build.is_terminal:
            if args.json:
                common.print_json(build.to_json())
            return 0 if build.status == BuildStatus.SUCCEEDED.value else 1
        if deadline is not None and time.monotonic() > deadline:
            raise common.CliError(
                f"gave up waiting for {request_id} after {args.timeout:g}s", exit_code=3
            )
        time.sleep(0.2)


def _ls(args: argparse.Namespace) -> int:
    def body(db: Database) -> int:
        builds = SqlBuildStore(db).list_builds(args.status, args.limit, args.queue)
        if args.json:
            common.print_json([b.to_json() for b in builds])
            return 0
        if not builds:
            print("no builds")
            return 0
        # Columns as wide as their longest value: CI build ids (gh:owner/repo/run/attempt)
        # and caller-chosen request ids have no fixed length.
        print_table([_row(b) for b in builds], _LS_COLUMNS)
        return 0

    return common.run_db(args, body)


_LS_COLUMNS = (
    ("build_id", "BUILD"),
    ("request_id", "REQUEST"),
    ("queue", "QUEUE"),
    ("status", "STATUS"),
    ("polls", "POLLS"),
    ("failure_reason", "REASON"),
)


def _row(build: Build) -> dict[str, Any]:
    return {key: getattr(build, key) for key, _ in _LS_COLUMNS} | {
        "failure_reason": build.failure_reason or ""
    }


def _show(args: argparse.Namespace) -> int:
    def body(db: Database) -> int:
        build = SqlBuildStore(db).get(args.id)
        if build is None:
            raise common.CliError(f"no build or request {args.id!r}", exit_code=1)
        if args.json:
            common.print_json(build.to_json())
            return 0
        for key, value in build.to_json().items():
            print(f"{key:>24}: {value}")
        return 0

    return common.run_db(args, body)


def _cancel(args: argparse.Namespace) -> int:
    def body(db: Database) -> int:
        store = SqlBuildStore(db)
        build = store.get(args.id)
        if build is None:
            raise common.CliError(f"no build or request {args.id!r}", exit_code=1)
        if build.is_terminal or build.build_id is None:
            print(f"{args.id} already finished ({build.status}); nothing to cancel")
            return 0
        store.request_cancel(build.build_id)
        SqlQueue(db).expedite(topics.BUILDSIGNAL, build.build_id)
        print(f"cancellation of {build.build_id} requested; the poll loop tells the runner")
        return 0

    return common.run_db(args, body)


def _watch(args: argparse.Namespace) -> int:
    from buildq.cli.watch import watch

    return common.run_db(args, lambda db: watch(SqlBuildStore(db), args.interval, once=args.once))
