"""Builds from the command line: submit, list, show, watch, cancel."""

from __future__ import annotations

import argparse
from typing import Any

from buildq.buildrunner import BuildStatus
from buildq.builds import (
    Build,
    BuildRequest,
    Builds,
    CancelOutcome,
    InvalidRequest,
    new_request,
    validate,
)
from buildq.cli import argtypes, common
from buildq.cli.output import print_table
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


def _submit(args: argparse.Namespace) -> int:
    if args.request_id == "":
        raise common.CliError("--request-id must not be empty (leave it out for a random one)")
    try:
        request = new_request(
            args.queue,
            args.head,
            args.base,
            metadata=_parse_meta(args.meta),
            request_id=args.request_id,
        )
        config = common.load(args) if not args.url else None
        if config is not None:
            validate(request, config.queues)
    except InvalidRequest as err:
        raise common.CliError(f"--{err.field}: {err.reason}" if err.field else str(err)) from None
    return common.run_db(args, lambda db: _publish_and_follow(Builds(db), request, args))


def _publish_and_follow(builds: Builds, request: BuildRequest, args: argparse.Namespace) -> int:
    submitted = builds.submit(request)
    if args.wait:
        return _follow(builds, request.request_id, args)
    if args.json:
        common.print_json({"request_id": request.request_id, "duplicate": submitted.duplicate})
    else:
        print(
            f"request {request.request_id} submitted"
            + (" (already submitted)" if submitted.duplicate else "")
        )
    return 0


def _follow(builds: Builds, request_id: str, args: argparse.Namespace) -> int:
    try:
        for build in builds.follow(request_id, timeout_s=args.timeout or None):
            if not args.json:
                print(f"{request_id} {build.build_id or '-'} {build.status}", flush=True)
    except TimeoutError as err:
        raise common.CliError(str(err), exit_code=3) from None
    # ``follow`` ends with the terminal build.
    if args.json:
        common.print_json(build.to_json())
    return 0 if build.build_status is BuildStatus.SUCCEEDED else 1


def _ls(args: argparse.Namespace) -> int:
    def body(db: Database) -> int:
        builds = Builds(db).list(args.status, queue=args.queue, limit=args.limit)
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
        build = Builds(db).get(args.id)
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
        cancellation = Builds(db).cancel(args.id)
        build = cancellation.build
        if build is None:
            raise common.CliError(f"no build or request {args.id!r}", exit_code=1)
        if cancellation.outcome is CancelOutcome.ALREADY_FINISHED:
            print(f"{args.id} already finished ({build.status}); nothing to cancel")
            return 0
        print(f"cancellation of {build.build_id} requested; the poll loop tells the runner")
        return 0

    return common.run_db(args, body)


def _watch(args: argparse.Namespace) -> int:
    from buildq.cli.watch import watch

    return common.run_db(args, lambda db: watch(Builds(db).store, args.interval, once=args.once))
