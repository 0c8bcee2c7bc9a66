"""What a run ends with: the console table, ``RESULTS.rst`` and the ``--json`` file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.harness import Figure


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 10 else f"{seconds:.2f} s"


def figure_text(fig: Figure) -> str:
    if fig.error is not None:
        return "-"
    if fig.value is None:
        return "?"
    if fig.unit == "x":
        floor = fig.extra.get("floor")
        return f"{fig.value:.2f}x" + (f" (floor {floor:.2f}x)" if floor else "")
    if fig.unit == "B":
        return f"{fig.value:.0f} B"
    if fig.unit == "cmd":
        return f"{fig.value:+.2f}"
    if fig.unit == "ms":
        return f"{fig.value:.2f} ms ({fig.extra.get('command', '?')})"
    return f"{fig.value:.2f} {fig.unit}"


def medians_text(fig: Figure) -> str:
    if fig.unit in ("B", "ms"):
        return ""
    return ", ".join(f"{k} {_ms(v)}" for k, v in fig.medians().items())


def console(figs: list[Figure]) -> str:
    lines = [f"{'row':<14} {'case':<44} {'figure':>18}  {'goal':<34} verdict"]
    lines.append("-" * 125)
    for f in figs:
        lines.append(f"{f.row:<14} {f.case:<44} {figure_text(f):>18}  {f.goal:<34} "
                     f"{f.verdict}")
    return "\n".join(lines)


def _rst_table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    rule = "  ".join("=" * w for w in widths)

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [rule, line(header), rule, *(line(r) for r in rows), rule]


def _breakdown(title: str, values: dict[str, float], limit: int = 12) -> list[str]:
    shown = [(k, v) for k, v in values.items() if abs(v) >= 0.01][:limit]
    if not shown:
        return []
    out = [f"{title}:", ""]
    out += _rst_table(["command / key", "added per node"],
                      [[f"``{k}``", f"{v:+.2f}"] for k, v in shown])
    return [*out, ""]


def results_rst(figs: list[Figure], env: dict[str, str], params: dict[str, Any],
                notes: list[str]) -> str:
    mode = "quick (``--quick``: reduced sizes)" if params["quick"] else "full"
    out = ["=================", "Benchmark results", "=================", "",
           f"Written by ``python benchmarks/run.py{' --quick' if params['quick'] else ''}"
           f"{' --only ' + params['only'] if params['only'] else ''}``; a **{mode}** run, "
           f"{params['rounds']} alternating rounds after a warm-up, timeout "
           f"{params['timeout']:.0f} s per measurement, "
           f"started {params['started']} UTC, took {params['took_s'] / 60:.1f} min"
           + ("." if params["steps_done"] == params["steps"] else
              f" **so far: PARTIAL, {params['steps_done']} of {params['steps']} steps "
              "done** (the run was interrupted or is still going)."), "",
           "Machine", "=======", ""]
    out += _rst_table(["item", "value"], [[k, v] for k, v in env.items()])
    met = sum(1 for f in figs if f.met)
    failed = sum(1 for f in figs if f.met is False)
    broken = sum(1 for f in figs if f.error is not None)
    out += ["", "Rows", "====", "",
            f"{met} met, {failed} failed, {broken} not run, of {len(figs)} figures. Ratios "
            "are flows/celery of the medians (below 1: flows faster).", ""]
    out += _rst_table(["row", "case", "figure", "medians", "goal", "verdict"],
                      [[f.row, f.case, figure_text(f), medians_text(f), f.goal, f.verdict]
                       for f in figs])
    out += ["", "Details", "=======", ""]
    for f in figs:
        if f.row == "commands/node" and f.error is None:
            totals = f.extra["client_commands_total_median"]
            out += [f"commands/node ({f.case}): client-sent commands, median over the "
                    f"rounds, flow run {totals['flow']:.0f}, bare run {totals['bare']:.0f}; "
                    "``INFO commandstats`` (scripts' inner commands included) adds "
                    f"{f.extra['commandstats_total_added_per_node']:+.2f} per node.", ""]
            out += _breakdown("Added client commands per node, by command",
                              f.extra["added_per_node_by_command"])
            out += _breakdown("By command and key suffix (ids blanked)",
                              f.extra["added_per_node_by_key"])
            out += _breakdown("INFO commandstats, added calls per node",
                              f.extra["commandstats_added_per_node"])
        if f.row == "submit+wait" and f.error is None:
            e = f.extra
            out += [f"submit+wait: {e['submit']['ms_per_call_median']:.2f} ms per "
                    f"``submit`` vs {e['delay']['ms_per_call_median']:.2f} ms per "
                    "``delay`` (median of the rounds' means).", ""]
        if f.row == "fair share" and f.error is None:
            e = f.extra
            out += [f"fair share: the big flow's releases during the small flow's wait, "
                    f"median {e['meanwhile_median']:.0f} (each round: {e['meanwhile']}); "
                    f"one round of the limit {e['one_round_s']:.1f} s, the backlog "
                    f"{e['backlog_s']:.0f} s.", ""]
        if f.row == "100k submit" and f.error is None:
            out += [f"100k submit: {f.extra['bytes_per_node']:.0f} B of used_memory per "
                    f"node; building the Flow took {_ms(f.medians()['build'])} (not "
                    "timed in the figure).", ""]
        if f.row == "SLOWLOG" and f.error is None:
            longest = "; ".join(f.extra.get("longest", [])) or "none"
            out += [f"SLOWLOG {f.case}: {f.extra.get('slowlog_entries', 0)} commands "
                    f"over 0.5 ms in the phase; the longest: {longest}.", ""]
        if f.error is not None:
            out += [f"{f.row} {f.case}: not run: {f.error}", ""]
    out += ["How each row was run", "====================", "", *notes, ""]
    return "\n".join(out)


def write_json(path: Path, figs: list[Figure], env: dict[str, str],
               params: dict[str, Any]) -> None:
    doc = {"params": params, "env": env, "rows": [f.as_json() for f in figs]}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
