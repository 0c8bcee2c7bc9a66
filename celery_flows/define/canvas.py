"""``Flow.from_canvas``: Celery canvases (signature, chain, group, chord, nested) as nodes.

This module owns the translation of a canvas into flow nodes. It never runs, freezes or
mutates the canvas; it reads it and adds one node per task with
:meth:`Flow._add_shaped`, giving each node its dependencies (``after``) and the shape
of the value Celery would prepend to its args (``input``, a ref over node ids).

The rules below are what Celery 5.7 *does* on a worker (``_chain.prepare_steps``,
``group._prepared`` / ``_freeze_unroll``, ``_chord.run``), checked against real runs
in ``tests/test_canvas.py``; where Celery's behaviour differs from its documentation,
Celery's behaviour wins:

- chain: nested chains are spliced in place (their own ``immutable`` flag is lost, as
  in Celery); every step receives the previous step's result; empty groups are
  skipped; a one-member group step is replaced by its member (the first step twice
  over, as ``prepare_steps`` unrolls the head before its loop and again inside it).
- group: every member receives the group's input; the result is the list of the
  members' results with nested groups flattened into it. Wherever Celery freezes the
  group first (a chord header, a chord body, any group inside a chain) it flattens
  with ``popleft``/``extendleft``, which reverses each nested group:
  ``chord([group(a, b), c], body)`` gives the body ``[b, a, c]``. A group applied on its
  own (the whole canvas) keeps nested members in order.
- chord: the header is a group receiving the chord's input (and the chord's own args
  and ``kwargs``); the body receives the list of header results, ``[]`` for an empty
  header and ``[r]`` for a one-task header. An immutable chord passes its input on to
  nobody but still runs after it.
- ``.si()`` signatures receive nothing.

Refused with :class:`FlowDefinitionError`: ``countdown``, ``eta``, ``link``,
``link_error`` and ``task_id`` on any element (an already frozen or applied canvas
carries Celery's task ids, so pass a fresh one); ``xmap``, ``xstarmap`` and ``chunks``,
which run Celery's built-in ``celery.*`` tasks, which flows does not guard or record
(use a group of task signatures); canvases without any task.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from celery.canvas import Signature, _basemap, _chain, _chord, chunks, group

from ..errors import FlowDefinitionError
from .entries import Builder
from .records import Ref
from .validate import forbidden_options

__all__ = ["CanvasOutput", "add_canvas", "flow_from_canvas"]

B = TypeVar("B", bound=Builder)

# Options Celery writes while freezing or running a canvas; they describe the canvas's
# own bookkeeping (chord callback, group membership, result tree) and must not reach a
# flow node.
_INTERNAL = frozenset(
    {"chord", "chain", "group_id", "group_index", "root_id", "parent_id", "reply_to"}
)


@dataclass(frozen=True)
class CanvasOutput:
    """Where a converted canvas ends: a successor waits for every node in ``after``
    and receives ``result`` (a ref; ``[]`` for an empty group), as Celery would pass
    the canvas's result on."""

    after: list[str]
    result: Ref


@dataclass(frozen=True)
class _Incoming:
    """What Celery passes to a canvas element when applying it: ``ref`` is the result
    it prepends (``None``: nothing), then partial ``args``/``kwargs`` (a chord's own),
    and ``options`` inherited from enclosing containers, which override the element's.
    """

    ref: Ref = None
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)


def flow_from_canvas(flow: B, canvas: Any) -> B:
    """Add every task of ``canvas`` to ``flow`` (see the module docstring) and return it."""
    before = len(flow)
    add_canvas(flow, canvas)
    if len(flow) == before:
        raise FlowDefinitionError(f"canvas {canvas!r} has no task to run")
    return flow


def add_canvas(
    flow: Builder, canvas: Any, *, after: Sequence[str] = (), input: Ref = None
) -> CanvasOutput:
    """Add ``canvas`` to ``flow`` as if Celery applied it once the nodes ``after`` are
    done, with ``input`` (a ref) as its partial argument; return where it ends."""
    return _Converter(flow).convert(_as_sig(canvas, None), list(after), _Incoming(input),
                                    alone=True)


class _Converter:
    def __init__(self, flow: Builder) -> None:
        self.flow = flow

    def convert(self, sig: Signature, after: list[str], inc: _Incoming, *,
                alone: bool = False) -> CanvasOutput:
        """``alone``: ``sig`` is the whole canvas (a group applied on its own keeps its
        nested groups in order)."""
        _check_options(sig)
        if isinstance(sig, _chain):
            return self._chain(sig, after, inc)
        if isinstance(sig, _chord):
            return self._chord(sig, after, inc)
        if isinstance(sig, group):
            return self._group(sig, after, inc, frozen=not alone)
        return self._task(sig, after, inc)

    def _task(self, sig: Signature, after: list[str], inc: _Incoming) -> CanvasOutput:
        if isinstance(sig, (chunks, _basemap)) or str(sig.task).startswith("celery."):
            # The attempt guard leaves Celery's built-in tasks alone, so such a node
            # would never record an outcome and its flow would never finish.
            raise FlowDefinitionError(
                f"canvas element {sig!r} runs Celery's built-in task {sig.task!r}, which "
                "cannot be a flow node; use a group of task signatures instead"
            )
        # Signature._merge: an immutable signature ignores partial args and kwargs,
        # not options; partial args go before the signature's own.
        if sig.immutable:
            ref: Ref = None
            args = tuple(sig.args)
            kwargs = dict(sig.kwargs)
        else:
            ref = inc.ref
            args = (*inc.args, *sig.args)
            kwargs = {**sig.kwargs, **inc.kwargs}
        options = {k: v for k, v in {**sig.options, **inc.options}.items()
                   if k not in _INTERNAL}
        plain = Signature(sig.task, args, kwargs, options=options,
                          immutable=bool(sig.immutable), app=sig._app)
        node = self.flow._add_shaped(plain, after=list(after), input=ref)
        return CanvasOutput([node.id], node.id)

    def _chain(self, chain: _chain, after: list[str], inc: _Incoming) -> CanvasOutput:
        steps = _chain_steps(chain)
        if not steps:
            raise FlowDefinitionError(f"canvas element {chain!r} is an empty chain")
        # _chain.run: the chain's options and the partial args go to its first step
        # only; later steps get nothing but the previous result. The chain's own
        # ``immutable`` is ignored: every clone (group member, chord body) drops it.
        step_inc = _Incoming(inc.ref, (*inc.args, *chain.args), inc.kwargs,
                             {**_own_options(chain), **inc.options})
        out = CanvasOutput(after, None)
        for step in steps:
            out = self.convert(step, out.after, step_inc)
            step_inc = _Incoming(out.result)
        return out

    def _group(self, grp: group, after: list[str], inc: _Incoming, *,
               frozen: bool) -> CanvasOutput:
        members = _flatten_frozen(grp.tasks, grp._app) if frozen else _flatten(grp)
        # group.apply_async: the group's options go to every member's apply_async,
        # where they override the member's own.
        member_inc = _Incoming(inc.ref, inc.args, inc.kwargs,
                               {**_own_options(grp), **inc.options})
        outs = [self.convert(m, after, member_inc) for m in members]
        result: Ref = [o.result for o in outs]
        if not frozen and len(outs) == 1 and isinstance(outs[0].result, list):
            # group.apply_async returns the inner GroupResult when its only member
            # ends in a group (the "group(A | group(B, C))" special case).
            result = outs[0].result
        return CanvasOutput(_union(after, outs), result)

    def _chord(self, chord: _chord, after: list[str], inc: _Incoming) -> CanvasOutput:
        body = chord.body
        if body is None:
            raise FlowDefinitionError(f"chord {chord!r} has no body")
        # _chord.apply_async: partial args (the incoming result first) go before the
        # chord's own args unless the chord is immutable; chord kwargs['kwargs'] are
        # partial kwargs of the header; the chord's options reach header and body.
        options = {**_own_options(chord), **inc.options}
        ref, args = (None, ()) if chord.immutable else (inc.ref, inc.args)
        header_inc = _Incoming(ref, (*args, *chord.args),
                               {**(chord.kwargs.get("kwargs") or {}), **inc.kwargs}, options)
        header = chord.tasks
        if isinstance(header, (group, _chain)):
            header = header.tasks
        elif isinstance(header, (Signature, dict)):
            header = [header]
        outs = [self.convert(m, after, header_inc)
                for m in _flatten_frozen(header, chord._app)]
        body_inc = _Incoming([o.result for o in outs], options=options)
        return self.convert(_as_sig(body, chord._app), _union(after, outs), body_inc)


def _chain_steps(chain: _chain) -> list[Signature]:
    """The steps ``_chain.prepare_steps`` runs, in order: nested chains spliced,
    one-member groups unrolled, empty groups dropped."""
    app = chain._app
    steps: deque[Signature] = deque(_as_sig(t, app) for t in chain.tasks)
    # prepare_steps first normalises the head so the first real task gets the partial
    # args: leading chains spliced, the head group unrolled once (and again below),
    # leading empty groups stripped while another step follows.
    stripped: Signature | None = None
    while steps:
        head = steps[0]
        if isinstance(head, _chain):
            _check_options(steps.popleft())
            steps.extendleft(reversed([_as_sig(t, app) for t in head.tasks]))
            continue
        if isinstance(head, group):
            head = steps[0] = _unroll_one(head)
            if len(steps) > 1 and _is_empty_group(head):
                stripped = steps.popleft()
                continue
        break
    if stripped is not None and not steps:
        steps.append(stripped)
    # The main loop walks from the last step back; a group is kept (a chord header for
    # what follows) unless it is empty and another step exists.
    reversed_steps: list[Signature] = []
    while steps:
        task = steps.pop()
        if isinstance(task, group):
            task = _unroll_one(task)
            if _is_empty_group(task) and (steps or reversed_steps):
                continue
        if isinstance(task, _chain):
            _check_options(task)
            steps.extend(_as_sig(t, app) for t in task.tasks)
            continue
        reversed_steps.append(task)
    return reversed_steps[::-1]


def _flatten(grp: group) -> list[Signature]:
    """Members of a group applied as such (``group._prepared``): nested groups in
    order, empty chains dropped."""
    out: list[Signature] = []
    for task in _tasks_of(grp.tasks, grp._app):
        if isinstance(task, group):
            _check_options(task)
            out.extend(_flatten(task))
        elif not (isinstance(task, _chain) and not task.tasks):
            out.append(task)
    return out


def _flatten_frozen(tasks: Any, app: Any) -> list[Signature]:
    """Members of a group Celery freezes first (``group._freeze_unroll``): nested
    groups are pushed back with ``extendleft``, which reverses them."""
    stack: deque[Signature] = deque(_tasks_of(tasks, app))
    out: list[Signature] = []
    while stack:
        task = stack.popleft()
        if isinstance(task, group):
            _check_options(task)
            stack.extendleft(_tasks_of(task.tasks, app))
        elif not (isinstance(task, _chain) and not task.tasks):
            out.append(task)
    return out


def _unroll_one(grp: group) -> Signature:
    """celery.canvas.maybe_unroll_group: a one-member group is its member."""
    tasks = list(grp.tasks)
    if len(tasks) == 1:
        _check_options(grp)
        return _as_sig(tasks[0], grp._app)
    return grp


def _is_empty_group(sig: Signature) -> bool:
    return isinstance(sig, group) and not list(sig.tasks)


def _tasks_of(tasks: Iterable[Any], app: Any) -> list[Signature]:
    return [_as_sig(t, app) for t in tasks]


def _as_sig(obj: Any, app: Any) -> Signature:
    # Canvases that went through JSON hold plain dicts; Signature.from_dict restores
    # the registered canvas type (chain, group, chord, xmap, ...) from subtask_type.
    if isinstance(obj, Signature):
        return obj
    if isinstance(obj, dict) and "task" in obj:
        sig: Signature = Signature.from_dict(obj, app=app)
        return sig
    raise FlowDefinitionError(
        f"expected a Celery signature or canvas (task.s(), chain, group, chord), got {obj!r}"
    )


def _check_options(sig: Signature) -> None:
    bad = forbidden_options(sig)
    if bad:
        raise FlowDefinitionError(
            f"canvas element {sig!r}: option(s) {', '.join(bad)} are not allowed in a flow; "
            "ordering comes from the canvas and flows assigns task ids (a canvas that was "
            "already frozen or applied carries Celery's task ids: pass a fresh one)"
        )


def _own_options(sig: Signature) -> dict[str, Any]:
    return {k: v for k, v in sig.options.items() if k not in _INTERNAL}


def _union(after: list[str], outs: list[CanvasOutput]) -> list[str]:
    """Every node a successor of several branches waits for; with no branch (an empty
    group) that is what the branches would have waited for."""
    if not outs:
        return list(after)
    merged: list[str] = []
    for out in outs:
        merged.extend(n for n in out.after if n not in merged)
    return merged
