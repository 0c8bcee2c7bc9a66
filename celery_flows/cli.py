"""``celery -A proj flows ...``: a thin click group over the extension.

Imported on every ``celery`` invocation (entry point ``celery.commands``), so it stays
light and finds the app at call time. It stands above the :class:`~celery_flows.Flows`
facade (it finds the facade on the app), not in ``observe/``, which the facade uses.
Exit codes: 0 ok, 1 not found or refused, 2 usage.
"""

from __future__ import annotations

import json
import sys
import threading
from typing import TYPE_CHECKING, Any

import click

from .errors import FlowsError

if TYPE_CHECKING:
    from .core import Flows

LIST_PAGE = 500  # most index entries `flows list` reads in one request


def _flows(ctx: click.Context) -> Flows:
    from .core import Flows

    app = getattr(ctx.obj, "app", None)
    ext = getattr(app, "flows", None)
    if not isinstance(ext, Flows):
        click.echo("error: the app has no celery-flows extension; pass -A with a module "
                   "that calls Flows(app)", err=True)
        ctx.exit(1)
    try:
        ext.config  # noqa: B018 - a bad setting is reported, not a traceback
    except FlowsError as exc:
        _fail(exc)
    return ext


def _fail(exc: Exception, ext: Any = None) -> None:
    from .config import scrub

    config = getattr(ext, "__dict__", {}).get("config") if ext is not None else None
    click.echo(f"error: {scrub(str(exc), config)}", err=True)
    sys.exit(1)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            # the registry unreachable: a one-line reason, no traceback, no password
            if not type(exc).__module__.startswith("redis"):
                raise
            ext = getattr(getattr(ctx.obj, "app", None), "flows", None)
            _fail(RuntimeError(f"the registry Redis failed: {type(exc).__name__}: {exc}"),
                  ext)


@click.group(name="flows", cls=_Group)
@click.pass_context
def flows(ctx: click.Context) -> None:
    """Inspect and manage celery-flows flows."""


@flows.command()
@click.argument("flow_id")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--watch", is_flag=True, help="Refresh until the flow finishes.")
@click.pass_context
def inspect(ctx: click.Context, flow_id: str, as_json: bool, watch: bool) -> None:
    """Show a flow's nodes: state, queue, attempts, timing, errors, what each waits for."""
    from .observe.inspect import describe
    from .observe.render import render_tree
    from .observe.render import watch as watch_flow

    ext = _flows(ctx)
    try:
        if watch and not as_json:
            watch_flow(ext.store, flow_id, click.echo)
            return
        doc = describe(ext.store, flow_id)
    except FlowsError as exc:
        _fail(exc, ext)
        return
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        click.echo(render_tree(doc))


@flows.command()
@click.argument("flow_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
@click.option("--since", default=None, metavar="ID",
              help="First replay the events after this event id.")
@click.pass_context
def events(ctx: click.Context, flow_id: str | None, as_json: bool, since: str | None) -> None:
    """Print events live: one flow's (from its first, until it finishes), or every
    flow's from now on."""
    from .observe.events import follow, format_event, format_json

    if since is not None:
        from .registry.events import valid_event_id

        if not valid_event_id(since):
            raise click.BadParameter(f"{since!r} is not an event id (like "
                                     "1764750000000-0)", param_hint="--since")
    ext = _flows(ctx)
    show = format_json if as_json else format_event
    try:
        for event in follow(ext.store, flow_id, since,
                            warn=lambda msg: click.echo(f"warning: {msg}", err=True)):
            if event is not None:
                click.echo(show(event))
    except FlowsError as exc:
        _fail(exc, ext)
    except KeyboardInterrupt:
        pass


@flows.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5580, show_default=True, type=click.IntRange(0, 65535))
@click.option("--read-only", is_flag=True, help="Refuse every action (403).")
@click.pass_context
def dashboard(ctx: click.Context, host: str, port: int, read_only: bool) -> None:
    """Serve the web dashboard (standard library only; works offline)."""
    from .dashboard import server

    ext = _flows(ctx)
    httpd = server(ext.app, host, port, read_only=read_only)
    bound = httpd.server_address
    mode = "read-only" if read_only or not ext.config.dashboard_token else "actions need the token"
    click.echo(f"celery-flows dashboard on http://{bound[0]!s}:{bound[1]}/ ({mode})")
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


@flows.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=9808, show_default=True, type=click.IntRange(0, 65535))
@click.pass_context
def metrics(ctx: click.Context, host: str, port: int) -> None:
    """Serve Prometheus metrics on /metrics (needs celery-flows[metrics])."""
    ext = _flows(ctx)
    try:
        from .metrics import serve
    except ImportError:
        _fail(RuntimeError("metrics need the optional extra: pip install "
                           "'celery-flows[metrics]'"), ext)
        return
    httpd, _thread = serve(ext.app, port, host)
    click.echo(f"celery-flows metrics on http://{host}:{httpd.server_address[1]}/metrics")
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass


def _change_command(name: str, doc: str, terminate: bool = False) -> None:
    @flows.command(name=name, help=doc)
    @click.argument("flow_id")
    @click.option("--dry-run", is_flag=True, help="Show what would change; change nothing.")
    @click.pass_context
    def command(ctx: click.Context, /, flow_id: str, dry_run: bool, **kwargs: Any) -> None:
        ext = _flows(ctx)
        try:
            report = getattr(ext, name)(flow_id, dry_run=dry_run, **kwargs)
        except FlowsError as exc:
            _fail(exc, ext)
            return
        _print_report(report)

    if terminate:
        click.option("--terminate", is_flag=True,
                     help="Also revoke running tasks with terminate=True (best effort, "
                          "prefork only).")(command)


def _print_report(report: dict[str, Any]) -> None:
    prefix = "would be " if report.get("dry_run") else ""
    for key in ("released", "skipped", "cancelled", "reopened", "terminated"):
        items = report.get(key) or []
        if items:
            click.echo(f"{prefix}{key}: {', '.join(items)}")
    click.echo(f"flow state: {report.get('state')}")


_change_command("cancel", "Cancel a flow: nothing is released after it.", terminate=True)
_change_command("pause", "Pause a flow: ready nodes wait until resume.")
_change_command("resume", "Resume a paused flow.")
_change_command("retry", "Re-run the nodes that failed under 'fail' and what they blocked.")


@flows.command()
@click.argument("flow_id")
@click.argument("node_id")
@click.option("--result", "result_json", default=None, help="The node's result, as JSON.")
@click.option("--error", default=None, help="Fail the node with this message.")
@click.pass_context
def signal(ctx: click.Context, flow_id: str, node_id: str, result_json: str | None,
           error: str | None) -> None:
    """Complete an external node (or fail it with --error)."""
    if result_json is not None and error is not None:
        raise click.UsageError("give --result or --error, not both")
    result = None
    if result_json is not None:
        try:
            result = json.loads(result_json)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON: {exc}", param_hint="--result") from None
    ext = _flows(ctx)
    try:
        state = ext.signal(flow_id, node_id, result=result, error=error)
    except FlowsError as exc:
        _fail(exc, ext)
        return
    click.echo(f"flow state: {state}")


@flows.command(name="list")
@click.option("--state", "state_filter", default=None, help="Only flows in this state.")
@click.option("--name", "name_filter", default=None, help="Only flows with this name.")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@click.pass_context
def list_flows(ctx: click.Context, state_filter: str | None, name_filter: str | None,
               limit: int) -> None:
    """List flows, newest first."""
    ext = _flows(ctx)
    shown = start = 0
    # bounded pages of the index until enough matches: never the whole index at once
    page = min(max(limit, 100), LIST_PAGE)
    more = True
    while more and shown < limit:
        rows, more = ext.store.flow_summaries(start, page)
        start += len(rows)
        for fid, meta in rows:
            if meta is None:
                continue  # expired; the --flows workers prune it from the index
            if state_filter and meta.get("state") != state_filter:
                continue
            if name_filter and meta.get("name") != name_filter:
                continue
            click.echo(f"{fid}\t{meta.get('name')}\t{meta.get('state')}\t"
                       f"{meta.get('done')}/{meta.get('total')} nodes finished")
            shown += 1
            if shown >= limit:
                break


@flows.command()
@click.argument("flow_id")
@click.option("--format", "fmt", type=click.Choice(["mermaid", "dot"]), default="mermaid",
              show_default=True)
@click.pass_context
def graph(ctx: click.Context, flow_id: str, fmt: str) -> None:
    """Print the flow's graph with node states."""
    from .observe.inspect import describe
    from .observe.render import to_dot, to_mermaid

    ext = _flows(ctx)
    try:
        doc = describe(ext.store, flow_id)
    except FlowsError as exc:
        _fail(exc, ext)
        return
    click.echo(to_mermaid(doc) if fmt == "mermaid" else to_dot(doc))


@flows.command()
@click.option("--json", "as_json", is_flag=True, help="print the numbers as JSON")
@click.pass_context
def stats(ctx: click.Context, as_json: bool) -> None:
    """Flows by state, queue slots, limiter levels, concurrency groups, live workers and
    their heartbeats."""
    from .observe.stats import collect

    ext = _flows(ctx)
    doc = collect(ext.store, ext.config)
    if as_json:
        click.echo(json.dumps(doc, default=str))
        return
    click.echo("flows: " + (", ".join(f"{k}: {v}" for k, v in sorted(doc["flows"].items()))
                            or "none"))
    click.echo("queue slots (flow tasks queued or running / cap):")
    for queue, (used, cap) in sorted(doc["queues"].items()):
        click.echo(f"  {queue}: {used}/{cap}")
    click.echo("rate limiters (seconds until the next release; waiting nodes):")
    for limiter, (ahead, waiting) in sorted(doc["limiters"].items()):
        click.echo(f"  {limiter}: {ahead:.2f}s, {waiting} waiting")
    click.echo("concurrency groups (flows running / limit, queued, per key):")
    for group, entry in sorted(doc["concurrency"].items()):
        limit = entry["limit"] if entry["limit"] is not None else "-"
        click.echo(f"  {group} (limit {limit} per key):" + ("" if entry["keys"] else " idle"))
        for key, counts in sorted(entry["keys"].items()):
            click.echo(f"    {key}: {counts['running']}/{limit} running, "
                       f"{counts['queued']} queued")
    click.echo("workers (last heartbeat):")
    for instance, (age, info) in sorted(doc["workers"].items()):
        role = " --flows" if info.get("manager") else ""
        click.echo(f"  {instance}: {age:.1f}s ago{role}")
