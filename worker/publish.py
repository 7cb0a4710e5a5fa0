"""Publishing events to API reply channels: a whole engine step in one
write, and the engines' token events without waiting for Redis's replies.

A batch line's events are kept instead (``keep``/``take``): nobody listens
to a batch, and its worker stores the line's result once, at its end
(``broker/batches.py``).

A job with an ``events_stream`` (a stored or background response) also has
each event appended to that Redis stream, in the same write as the
publish and before it, capped and with a TTL: a client that lost its connection resumes
from it through any API process, and a job nobody follows still leaves its
whole answer there."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from broker.schemas import STREAM_EVENT_FIELD, AnyEvent, Delta, Done, Started, events_message

log = logging.getLogger("llmq.worker.publish")

Command = tuple[str | int, ...]
# Told the jobs whose events, sent before, reached no subscriber: their API
# process is gone, so nobody will read them (``Publisher.on_unheard``).
UnheardHandler = Callable[[set[str]], object]
# Replies of sent events are read back once this many wait, in one read from
# the socket: reading them on every token cost a system call per token.
UNREAD_MAX = 64


class Publisher:
    def __init__(self, r: redis.Redis, stream_max_events: int = 100_000, stream_ttl_s: int = 30 * 24 * 3600) -> None:
        # A connection of the pool's kept for this publisher alone: a step's
        # commands go out in one write and their replies are read back,
        # without the pool's get/release (each with a health poll of the
        # socket) and the pipeline object that redis-py builds per call: this
        # runs once per token at one client, and its CPU is taken from the
        # engine. A broken one goes back to the pool and a new one is taken:
        # taking it connects it, through Sentinel when one is configured.
        self._pool = r.connection_pool
        # The client's retry policy; a Sentinel client has none of its own: once more, on a new connection.
        self._retry = r.get_retry() or Retry(NoBackoff(), 1)
        self._conn: redis.connection.ConnectionInterface | None = None
        self._conn_lock = threading.Lock()  # also guards the two below
        self._unread: list[list[str]] = []  # per command sent and not read back: the jobs its reply counts for
        self._gone: set[str] = set()  # jobs whose events reached no subscriber, not yet told
        self._unheard: UnheardHandler | None = None
        self._stream_max = stream_max_events
        self._stream_ttl_s = stream_ttl_s
        self._kept: dict[str, list[AnyEvent]] = {}
        self._streams: dict[str, str] = {}  # job id -> its events stream
        self._lock = threading.Lock()  # the engine's step thread and Celery's threads publish

    def on_unheard(self, handler: UnheardHandler) -> None:
        """The one handler ``send`` tells of unheard jobs, whichever engine
        or thread sends: the runtime's, which cancels them wherever they
        run. Until one is set they are not told."""
        self._unheard = handler

    def stream(self, job_id: str, key: str) -> None:
        """From now on this job's events are also appended to stream ``key``."""
        with self._lock:
            self._streams[job_id] = key

    def unstream(self, job_id: str) -> None:
        with self._lock:
            self._streams.pop(job_id, None)

    def keep(self, job_id: str) -> None:
        """From now on this job's events are kept, not published."""
        with self._lock:
            self._kept[job_id] = []

    def take(self, job_id: str) -> list[AnyEvent]:
        """The kept events of a job, merged (``merge``); it is published again from now on."""
        with self._lock:
            return merge(self._kept.pop(job_id, []))

    def publish(self, events: Sequence[tuple[str, AnyEvent]]) -> list[int]:
        """Publish in order and wait for Redis; returns, per event, how many
        subscribers got it (a kept or streamed event counts at least one: its
        job must not look abandoned, since its stream keeps it for a client
        to come)."""
        counts = [1] * len(events)
        commands, owners = self._commands(events)
        if commands:
            for owned, reply in zip(owners, self._execute(commands, wait=True)):
                for i in owned:
                    counts[i] = int(reply)  # type: ignore[call-overload]
        return counts

    def send(self, events: Sequence[tuple[str, AnyEvent]], first: Sequence[Command] = ()) -> None:
        """Publish in order without waiting for Redis: the engines' token
        events, and each job's Started. Their replies are read later
        (``UNREAD_MAX``), from the socket's buffer, so the caller does not
        sleep and wake again on every token (at one client that wake cost as
        much CPU as the publish). ``first`` are commands written just before
        the events, in the same write. The jobs whose events, sent before,
        reached no subscriber or went down with a broken connection go to the
        ``on_unheard`` handler, here, in the caller's thread."""
        commands, owners = self._commands(events)
        jobs = [[] for _ in first] + [[events[i][1].job_id for i in owned] for owned in owners]
        starts = any(isinstance(event, Started) for _, event in events)
        try:
            self._execute([*first, *commands], wait=False, jobs=jobs, probe=starts)
        except redis.ConnectionError:  # Redis is unreachable: these events are lost too (see drop in _execute)
            with self._conn_lock:
                self._gone.update(job for owned in jobs for job in owned)
            raise
        with self._conn_lock:
            gone, self._gone = self._gone, set()
        if gone and self._unheard is not None:
            self._unheard(gone)

    def _commands(self, events: Sequence[tuple[str, AnyEvent]]) -> tuple[list[Command], list[list[int]]]:
        """The commands for the events that are not kept and, per command,
        the events whose subscriber count its reply is. Events bound for the
        same channel go in one message (``events_message``): at 16 clients a
        step's 16 tokens are one PUBLISH for Redis and one message for the
        API to read, not 16. A streamed event is appended to its stream
        before it is published, so a client that resumes from the stream
        never misses what it did not hear."""
        commands: list[Command] = []
        owners: list[list[int]] = []
        with self._lock:
            sent = [(i, self._streams.get(event.job_id)) for i, (_, event) in enumerate(events)
                    if not self._keep(event)]
        by_channel: dict[str, tuple[list[str], list[int]]] = {}  # channel -> its events' JSON, the counted ones
        for i, key in sent:
            channel, event = events[i]
            data = event.model_dump_json()
            if key is not None:
                commands += [("XADD", key, "MAXLEN", "~", self._stream_max, "*", STREAM_EVENT_FIELD, data),
                             ("EXPIRE", key, self._stream_ttl_s)]
                owners += [[], []]
            if channel:
                datas, counted = by_channel.setdefault(channel, ([], []))
                datas.append(data)
                if key is None:  # a streamed event is heard by its stream
                    counted.append(i)
        for channel, (datas, counted) in by_channel.items():
            commands.append(("PUBLISH", channel, events_message(datas)))
            owners.append(counted)
        return commands, owners

    def _keep(self, event: AnyEvent) -> bool:
        kept = self._kept.get(event.job_id)
        if kept is not None:
            kept.append(event)
        return kept is not None

    def _execute(self, commands: list[Command], *, wait: bool, jobs: list[list[str]] | None = None,
                 probe: bool = False) -> list[object]:
        """Reads the replies of earlier ``send`` calls, then sends the
        commands in one write and, with ``wait``, returns their replies.
        Without, ``jobs`` (per command, the jobs its reply counts for) wait
        in ``_unread``. A broken connection is dropped and the write retried
        on a new one, as the connection's retry policy says; unread replies
        are lost with it. With ``probe`` (a job's Started), a connection
        Redis has closed is found before the write: written into it, without
        a reply awaited, a Started is lost without an error, and its request
        waits for it until the API's first_event_timeout_s."""
        def roundtrip() -> list[object]:
            if self._conn is None:
                self._conn = self._pool.get_connection()
            conn = self._conn
            if wait or probe or len(self._unread) >= UNREAD_MAX:
                self._read_unread(conn, probe=probe)
            if commands:
                conn.send_packed_command(conn.pack_commands(commands), check_health=False)
            if wait:
                return [conn.read_response() for _ in commands]
            assert jobs is not None
            self._unread += jobs
            return []

        def drop(_: Exception) -> None:
            # The connection broke (Redis failed over, restarted): the events
            # whose replies were not read back may have gone down with it,
            # and the API processes that lost Redis too have failed their
            # jobs (api/replies.py). Named as gone, the engine cancels them
            # rather than run them on for nobody, in slots new jobs need.
            self._gone.update(job for owned in self._unread for job in owned)
            self._unread.clear()
            self._give_back()

        with self._conn_lock:
            try:
                return self._retry.call_with_retry(roundtrip, drop)
            except BaseException:
                drop(RuntimeError())
                raise

    def _give_back(self) -> None:
        """The connection to the pool, closed: its replies cannot be read in order any more."""
        if self._conn is not None:
            self._conn.disconnect()
            self._pool.release(self._conn)
            self._conn = None

    def _read_unread(self, conn: redis.connection.ConnectionInterface, probe: bool = False) -> None:
        """The replies of earlier sends; a PUBLISH that reached nobody names
        its jobs in ``_gone``. Taken off ``_unread`` only once all are read
        (and, with ``probe``, the connection found open): a connection that
        breaks meanwhile names them all (``drop`` in ``_execute``)."""
        replies: list[object] = []
        for _ in self._unread:
            try:
                replies.append(conn.read_response())
            except redis.ResponseError as exc:  # one command failed; its connection is fine
                log.error("an event's command failed in Redis: %s", exc)
                replies.append(None)
        if probe:
            conn.can_read(timeout=0)  # with every reply read, only a closed connection is readable: it raises
        unread, self._unread = self._unread, []
        for jobs, reply in zip(unread, replies):
            if reply == 0:
                self._gone.update(jobs)

    def close(self) -> None:
        with self._conn_lock:
            self._give_back()


def merge(events: list[AnyEvent]) -> list[AnyEvent]:
    """One Delta then one Done per choice (after Started): what the API
    builds a whole answer from, a token's event each would take ~100 bytes
    apiece in Redis. Any other event (Error, Embeddings) is kept as is."""
    started: list[AnyEvent] = []
    deltas: dict[int, Delta] = {}
    dones: dict[int, Done] = {}
    other: list[AnyEvent] = []
    for ev in events:
        if isinstance(ev, Started):
            started.append(ev)
        elif isinstance(ev, Delta):
            before = deltas.get(ev.index)
            if before is None:
                deltas[ev.index] = ev.model_copy(deep=True)
                continue
            before.text += ev.text
            before.completion_tokens = ev.completion_tokens
            if ev.logprobs is not None:
                before.logprobs = (before.logprobs or []) + ev.logprobs
            if ev.tool_calls is not None:
                before.tool_calls = (before.tool_calls or []) + ev.tool_calls
        elif isinstance(ev, Done):
            dones[ev.index] = ev
        else:
            other.append(ev)
    merged: list[AnyEvent] = list(started)
    for index in sorted(deltas.keys() | dones.keys()):
        merged += [e for e in (deltas.get(index), dones.get(index)) if e is not None]
    return merged + other
