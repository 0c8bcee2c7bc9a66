"""The only place registry keys are built. This docstring is the key schema.

All keys of one flow share the hash tag ``{<flow id>}`` so that every Lua
transition touches a single Redis Cluster slot::

    <prefix>:{<fid>}:meta      hash   flow record: v, id, name, state, nonce,
                                      counters (total, done, failed), times, digest
    <prefix>:{<fid>}:nodes     hash   node id -> JSON node record (definition + state);
                                      a map's item is written at its first change
                                      (until then it reads as made from its map's
                                      record: define/records.py item_record)
    <prefix>:{<fid>}:args      hash   user data, serialised with task_serializer and
                                      only copied by Lua: node id -> [args, kwargs] or
                                      [args, kwargs, signature options];
                                      "ctx#" -> the flow's context; "ctx#<sub-flow id>"
                                      -> a sub-flow's context overlay (``#`` is never
                                      in a node id); "@<token>:<i>" -> element i of
                                      the list a map expanded over (result_serializer),
                                      its item's input, staged before the expansion
                                      that names the token (engine/maps.py)
    <prefix>:{<fid>}:results   hash   node id -> serialised result (result_serializer)
    <prefix>:{<fid>}:ready     zset   outbox: node id -> time it may be claimed for
                                      publishing (0 = now; a claim pushes it forward;
                                      HELD of lua/engine/constants.lua, 1e15 = held
                                      by a limiter)
    <prefix>:{<fid>}:timed     zset   node id -> when something is due for it: an
                                      external node's deadline, a held retry, a poke
    <prefix>:{<fid>}:waiting   hash   fan-in counters: node id -> how many of its
                                      remaining dependencies are not terminal yet, kept
                                      out of the record so that a completion updates it
                                      in O(1) (HINCRBY) instead of re-encoding a record
                                      listing all W dependencies (O(W^2) per fan-in);
                                      meaningful while the node is pending only. A
                                      counter at or below 0 is checked against the
                                      dependencies' records (engine/settle.lua), so a
                                      flow of format 1.1 (counter in the record, none
                                      here) stays correct. "<node>#<dep>" marks an edge
                                      removed while dep was not terminal. A node of
                                      many dependencies is evaluated in steps
                                      (lua/engine/scan.lua; ``|`` is never in a node id):
                                      "<node>|scan" -> "<next offset> <kgen> <edges>
                                      <ok> <failed>" while its scan goes on,
                                      "<node>|k" -> one letter per edge read (o ok,
                                      f failed, s skipped, c cancelled, r removed),
                                      "|scans" -> the nodes being scanned, joined by
                                      ``,`` (meta scanning=1 while there are any; meta
                                      kgen moves when an edge changes kind). An
                                      expanded map (SPEC section 12) waits for its items
                                      here like a node for its dependencies;
                                      "<map>|rel" -> how many of its items were
                                      released, while some are not (meta mapping: how
                                      many maps), "|items" -> the maps whose next items
                                      the claims release a step at a time
                                      (lua/engine/evaluate.lua)
    <prefix>:{<fid>}:work      list   terminal nodes whose dependents a transition had no
                                      budget left to settle ("<next edge> <node id>",
                                      meta settling=1 while it holds any): the next claim
                                      goes on with them (lua/engine/settle.lua)
    <prefix>:{<fid>}:reopen    set    a chunked retry's nodes not yet reopened: written
                                      while staging (hidden until meta reopening=1, then
                                      they read as pending), drained by the claims
                                      (lua/engine/reopen.lua)
    <prefix>:{<fid>}:events    stream the flow's events (SPEC section 11), appended by the
                                      engine's flush() (lua/engine/cache.lua), one field
                                      ``e``: the event as JSON without its id;
                                      ``flows_events_maxlen`` entries (approximate);
                                      expires with the flow. On a single Redis each
                                      entry has the id of the same event in the
                                      registry's stream (below)
    <prefix>:{<fid>}:hooks     list   node events still to post to the flow's webhook
                                      (opted-in flows only, SPEC section 8): one JSON
                                      ``{"id", "e"}`` per terminal node transition,
                                      appended by flush() beside the stream entry, popped
                                      by the deliverer once posted (worker/webhooks.py).
                                      Never trimmed, so ``flows_events_maxlen`` cannot
                                      drop an undelivered one; expires with the flow

Reply caches, one per transition call, so that a call redis-py re-sends after a
connection error gets the first answer (``lua/_request.lua``)::

    <prefix>:{<tag>}:req:<rid> string the call's reply (cmsgpack), ``REPLY_TTL`` (120 s)
                                      in scripts.py; ``<tag>`` is the hash tag of the
                                      script's other keys: the flow id for flow scripts,
                                      ``sched`` for admit.lua, ``workers`` for
                                      heartbeat.lua. claim.lua keeps only the ids of the
                                      entries it claimed. An empty ``<rid>`` (dry runs)
                                      keeps nothing.

``<rid>`` is a request id (``ids.new_request_id``), drawn once per logical call before
redis-py's retry loop. Cost, measured by ``benchmarks/reply_cache.py`` on redis-server
6.2: 115-135 bytes per kept reply (``MEMORY USAGE``; create, claim of one entry,
published, start with an empty context, complete), plus whatever the reply carries: a
start its flow context, a change its report (a cancel lists every node it cancelled);
8-20 µs more Redis time per call (one GET, one SET; measured on a shared, noisy machine)
on a 45-60 µs progress.lua. At 1,000 transitions a second, 120,000 keys, some 15-20 MB.

Pub/sub channel (not a key; its name is stored in the flow's meta as ``channel``)::

    <prefix>:{<fid>}:done      the new state is published when the flow ends

Global keys, one slot each, never touched by a flow script on a cluster. Every time in a score is
Redis ``TIME`` (read by the scripts, or by ``Store.now()``), never a machine's clock::

    <prefix>:events            stream every flow's events, as in the flow's stream, about
                                      ``flows_events_maxlen`` entries. Written by the flow
                                      scripts on a single Redis only (passed last, after
                                      the request key and GKEYS, see lua/_request.lua);
                                      on Redis Cluster it is of another slot than any
                                      flow: there the --flows workers copy each flow's
                                      stream into it (worker/eventcopy.py), each entry
                                      with a second field ``src``, its id in the flow's
                                      stream (readers drop a re-copied one)
    <prefix>:{events}:due      zset   Redis Cluster only: flow id -> when a client last
                                      began a transition of it (written before the
                                      script, so a crash cannot lose the note); the
                                      copier drains it. A flow's meta keeps its cursor
                                      (``ev_copied``, the last id copied) and ``ev_due``
                                      (1 while events are not copied: set by flush() in
                                      the same script as the events, cleared by
                                      events_copied.lua), which a slow walk of the index
                                      reads to repair a note removed too early
    <prefix>:recoveries        string how many nodes recovery took from a lost worker (a
                                      new attempt or WorkerLostError), ever: the counter
                                      celery_flows_recoveries_total (metrics.py)
    <prefix>:index             zset   flow id -> creation time (``flows list``, read in
                                      bounded pages); entries of expired flows are pruned
                                      a chunk at a time by the --flows workers
    <prefix>:dispatch          zset   flow id -> time a process began a transition that
                                      may leave nodes in the outbox; the sweeper drains
                                      entries older than a grace period
    <prefix>:queued            zset   task id -> publish time, until a worker starts it
    <prefix>:cancelling        zset   flow id -> time a chunked cancel began
                                      (lua/cancel.lua), until its last step; the
                                      sweeper finishes entries older than a grace period
    <prefix>:timers            zset   flow id -> when its outbox holds something due (an
                                      external node's deadline, a retry, a sensor poke)
    <prefix>:webhooks          zset   flow id -> when to (re)try delivering its webhook
    <prefix>:webhook-lock:<f>  string one deliverer at a time
    <prefix>:{workers}:beats   zset   worker instance -> last heartbeat (Redis TIME)
    <prefix>:{workers}:info    hash   worker instance -> JSON (hostname, pid, manager, ...)
                                      (one hash tag: heartbeat.lua writes both)
    <prefix>:leases:<inst>     zset   task id -> time received, for every flow message a
                                      worker instance holds (received, not yet recorded)
    <prefix>:recovering:<inst> string lock while one manager recovers a lost instance
    <prefix>:batches           zset   add_bulk batch id -> open time, until finished
    <prefix>:{batch:<id>}      hash   batch record: state (pending|committed|aborted),
                                      created (Redis TIME), flows (JSON list of ids)

Scheduling keys share the hash tag ``{sched}`` so that admit.lua checks every limit of
a node in one atomic step (one slot on Redis Cluster)::

    <prefix>:{sched}:state:<limiter>  rate limiter: theoretical arrival time (GCRA);
                                      queue cap ("queue:<name>"): zset task id -> time
    <prefix>:{sched}:waits            set of limiter ids that have waiting nodes

Each limiter's waiting nodes are served round-robin (fair share, SPEC sections 7 and
12; lua/fair/share.lua): by share unit (``ids.share_unit``: ``k|<cgroup>|<ckey>`` for a
flow with a concurrency key in its meta, ``f|<flow>`` for one without), then by flow
within the unit, then in section 7's order within the flow. Five keys a limiter, every
step O(log n) (``<a|p>``: active or parked, ``<turn>`` 15 digits)::

    <prefix>:{sched}:rr:<limiter>  zset   unit -> turn (the lowest is served next; a
                                          served unit takes the last turn; 1e12 more
                                          while all its flows are parked)
    <prefix>:{sched}:fl:<limiter>  zset   all scores 0: "<unit> <a|p><turn> <flow>",
                                          the flows of a unit in turn order, the
                                          active ones first
    <prefix>:{sched}:ft:<limiter>  hash   "<unit> <flow>" -> "<a|p><turn>", its entry
    <prefix>:{sched}:mq:<limiter>  zset   all scores 0: "<flow> <member>", a flow's
                                          members together in order-key order; a
                                          member is "<order>|<flow>|<node>|<attempt>"
    <prefix>:{sched}:pk:<limiter>  zset   "<unit> <flow>" -> since when the flow is
                                          parked: its node was refused by another
                                          limiter when its turn came here; it keeps
                                          that turn
    <prefix>:{sched}:wait:<limiter> zset  the single wait queue of the versions before
                                          fair share (members in order-key order): no
                                          longer written; the releaser tries what an
                                          older version left there first, and
                                          admit.lua re-files a refused one in the fair
                                          queues. Not a flow record format: no
                                          FORMAT_VERSION of its own

Concurrency groups (SPEC section 12, engine/groups.py) share the hash tag ``{conc}`` so
that the global scripts conc_enqueue.lua and conc_admit.lua decide a key's places in one
atomic step; ``<gk>`` is ``<group>|<key>`` (``|`` is in neither a group name nor a key)::

    <prefix>:{conc}:run:<gk>   zset   flow id -> when it was admitted: the flows holding
                                      a place (at most the group's limit)
    <prefix>:{conc}:line:<gk>  zset   flow id -> arrival number (``{conc}:seq``): the
                                      flows waiting for a place, first come first served
    <prefix>:{conc}:life:<gk>  hash   flow id -> the life (meta ``cgen``) its entry in run
                                      or line belongs to: a flow reopened by retry is a
                                      new life, and a stale free of the old one is a no-op
    <prefix>:{conc}:keys       zset   "<gk>" -> last arrival, while the key has entries
                                      (``flows stats``, the reconciler's round)
    <prefix>:{conc}:evict      zset   flow id -> time: flows to cancel (cancel_newest's
                                      arrival, cancel_oldest's victim), until cancelled
    <prefix>:{conc}:seq        string the arrival counter

A flow of a group keeps in its meta ``cgroup``, ``ckey`` (read by other parts: keep the
names), ``on_limit``, ``cgen`` (its life, from 1) and, while it waits for a place,
``cwait=1`` and ``croots`` (its roots, released by conc_start.lua).

Task ids, worker instances, wait-queue members and the other identity formats are
built and parsed in ``ids.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..define.records import context_field

__all__ = ["FLOW_KEYS", "FORMAT_MAJOR", "FORMAT_VERSION", "Keys", "context_field"]

FLOW_KEYS = ("meta", "nodes", "args", "results", "ready", "timed", "waiting", "work",
             "reopen", "events", "hooks")

#: The record format this code writes (meta ``v``); it reads every ``FORMAT_MAJOR.x``.
#: 1.1: contexts and signature options are blobs in the args hash.
#: 1.2: fan-in counters in the waiting hash, no longer in the node record.
#: 1.3: a record's ``after`` joined into one string and an input that is the list of
#: its dependencies' results stored as ``"*"`` (define/records.py compact); the scans of
#: wide nodes in the waiting hash.
#: 1.4: maps (SPEC section 12): records of kind "map", their items, their staged elements.
FORMAT_VERSION = "1.4"
FORMAT_MAJOR = 1


@dataclass(frozen=True)
class Keys:
    prefix: str

    def flow(self, flow_id: str) -> list[str]:
        """The keys of one flow, in the order every flow script expects them."""
        return [f"{self.prefix}:{{{flow_id}}}:{name}" for name in FLOW_KEYS]

    def meta(self, flow_id: str) -> str:
        return f"{self.prefix}:{{{flow_id}}}:meta"

    def nodes(self, flow_id: str) -> str:
        return f"{self.prefix}:{{{flow_id}}}:nodes"

    def args(self, flow_id: str) -> str:
        return f"{self.prefix}:{{{flow_id}}}:args"

    def results(self, flow_id: str) -> str:
        return f"{self.prefix}:{{{flow_id}}}:results"

    def work(self, flow_id: str) -> str:
        return f"{self.prefix}:{{{flow_id}}}:work"

    def reopen(self, flow_id: str) -> str:
        return f"{self.prefix}:{{{flow_id}}}:reopen"

    def flow_events(self, flow_id: str) -> str:
        return f"{self.prefix}:{{{flow_id}}}:events"

    def hooks(self, flow_id: str) -> str:
        return f"{self.prefix}:{{{flow_id}}}:hooks"

    @property
    def events_due(self) -> str:
        return f"{self.prefix}:{{events}}:due"

    def events_lock(self, flow_id: str) -> str:
        return f"{self.prefix}:{{events}}:lock:{flow_id}"

    @property
    def recoveries(self) -> str:
        return f"{self.prefix}:recoveries"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    def channel(self, flow_id: str) -> str:
        return f"{self.prefix}:{{{flow_id}}}:done"

    @property
    def index(self) -> str:
        return f"{self.prefix}:index"

    @property
    def dispatch(self) -> str:
        return f"{self.prefix}:dispatch"

    @property
    def cancelling(self) -> str:
        return f"{self.prefix}:cancelling"

    @property
    def timers(self) -> str:
        return f"{self.prefix}:timers"

    @property
    def webhooks(self) -> str:
        return f"{self.prefix}:webhooks"

    def webhook_lock(self, flow_id: str) -> str:
        return f"{self.prefix}:webhook-lock:{flow_id}"

    @property
    def queued(self) -> str:
        return f"{self.prefix}:queued"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:{{workers}}:beats"

    @property
    def worker_info(self) -> str:
        return f"{self.prefix}:{{workers}}:info"

    def limiter_state(self, limiter_id: str) -> str:
        return f"{self.prefix}:{{sched}}:state:{limiter_id}"

    def wait_queue(self, limiter_id: str) -> str:
        return f"{self.prefix}:{{sched}}:wait:{limiter_id}"

    @property
    def waits(self) -> str:
        return f"{self.prefix}:{{sched}}:waits"

    def conc(self, group: str, key: str) -> list[str]:
        """The keys conc_enqueue.lua and conc_admit.lua take for one key of a group:
        running set, line, life hash."""
        gk = f"{group}|{key}"
        return [f"{self.prefix}:{{conc}}:{name}:{gk}" for name in ("run", "line", "life")]

    @property
    def conc_keys(self) -> str:
        return f"{self.prefix}:{{conc}}:keys"

    @property
    def conc_evict(self) -> str:
        return f"{self.prefix}:{{conc}}:evict"

    @property
    def conc_seq(self) -> str:
        return f"{self.prefix}:{{conc}}:seq"

    def fair_units(self, limiter_id: str) -> str:
        return f"{self.prefix}:{{sched}}:rr:{limiter_id}"

    def fair_flows(self, limiter_id: str) -> str:
        return f"{self.prefix}:{{sched}}:fl:{limiter_id}"

    def fair_turns(self, limiter_id: str) -> str:
        return f"{self.prefix}:{{sched}}:ft:{limiter_id}"

    def fair_queue(self, limiter_id: str) -> str:
        return f"{self.prefix}:{{sched}}:mq:{limiter_id}"

    def fair_parked(self, limiter_id: str) -> str:
        return f"{self.prefix}:{{sched}}:pk:{limiter_id}"

    def fair(self, limiter_id: str) -> list[str]:
        """A limiter's fair wait queues, in the order lua/fair/share.lua takes them."""
        return [self.fair_units(limiter_id), self.fair_flows(limiter_id),
                self.fair_turns(limiter_id), self.fair_queue(limiter_id),
                self.fair_parked(limiter_id)]

    def request(self, key: str, request_id: str) -> str:
        """The reply cache of one call of a script whose first key is ``key``: in that
        key's hash slot (Redis Cluster runs a script on one slot only)."""
        start = key.find("{")
        end = key.find("}", start + 1)
        if start < 0 or end <= start + 1:
            raise ValueError(f"key {key!r} has no hash tag: a script's keys must share one")
        return f"{self.prefix}:{key[start:end + 1]}:req:{request_id}"

    def leases(self, instance: str) -> str:
        return f"{self.prefix}:leases:{instance}"

    def recovering(self, instance: str) -> str:
        return f"{self.prefix}:recovering:{instance}"

    @property
    def batches(self) -> str:
        return f"{self.prefix}:batches"

    def batch(self, batch_id: str) -> str:
        return f"{self.prefix}:{{batch:{batch_id}}}"
