"""``celery -A proj flows ...``: a thin click group over the extension.

Imported on every ``celery`` invocation (entry point ``celery.commands``), so it stays
light and finds the app at call time. Exit codes: 0 ok, 1 not found or refused, 2 usage.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from .errors import FlowsError


def _flows(ctx: click.Context) -> Any:
    from .core import Flows

    app = getattr(ctx.obj, "app", None)
    ext = getattr(app, "flows", None)
    if not isinstance(ext, Flows):
        click.echo("error: the app has no celery-flows extension; pass -A with a module "
                   "that calls Flows(app)", err=True)
        ctx.exit(1)
    return ext


def _fail(exc: Exception) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(1)


@click.group(name="flows")
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
    from .inspect import describe, render_tree
    from .inspect import watch as watch_flow

    ext = _flows(ctx)
    try:
        if watch and not as_json:
            watch_flow(ext, flow_id, click.echo)
            return
        doc = describe(ext, flow_id)
    except FlowsError as exc:
        _fail(exc)
        return
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        click.echo(render_tree(doc))
