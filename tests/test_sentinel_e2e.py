"""Redis behind Sentinel, failing over under load: a primary, a replica and
three Sentinels (real ``redis-server`` processes), an API, a worker and
Flower configured with LLMQ_REDIS_SENTINELS. The primary is SIGKILLed while
8 clients send requests; no llmq process is restarted, and the service is
back within 2 s of the Sentinels' promotion of the replica.

What those seconds cost before (README setup, 4 clients): the worker's
Celery consumer reconnected at kombu's pauses, 2, 4, 6... s after the
primary died, so 6 s after the kill and sometimes 30 (worker/consumer.py);
and a job sent after the promotion but before the API had subscribed its
reply channel again lost its events (api/replies.py ``open``)."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.procs import DEMO_MODEL, Proc, free_port, spawn, start_api, start_worker, wait_for, wait_model

pytestmark = pytest.mark.e2e

MASTER = "llmq-primary"
CLIENTS = 8
PROMOTED_WITHIN_S = 30  # the Sentinels' part: down-after 1 s, then an election
BACK_WITHIN_S = 2.0  # llmq's part: from the promotion to a request that succeeds, and all after it
REQUEST_TIMEOUT_S = 90  # a request still open after this is a hang


def _redis(tmp: Path, name: str, port: int, *extra: str) -> Proc:
    (tmp / name).mkdir()
    return spawn(f"{name}-{port}", ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir",
                                    str(tmp / name), "--save", "", "--appendonly", "no", *extra], {})


def _sentinel(tmp: Path, port: int, primary: int) -> Proc:
    conf = tmp / f"sentinel-{port}.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp}\n"
                    f"sentinel monitor {MASTER} 127.0.0.1 {primary} 2\n"
                    f"sentinel down-after-milliseconds {MASTER} 1000\n"
                    f"sentinel failover-timeout {MASTER} 10000\n"
                    f"sentinel parallel-syncs {MASTER} 1\n")
    return spawn(f"sentinel-{port}", ["redis-server", str(conf), "--sentinel"], {})


def _pings(port: int) -> bool:
    try:
        return bool(redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _promotion_watch(sentinel_ports: list[int], new_primary: int, stop: threading.Event) -> list[float]:
    """Fills the returned list with the monotonic time at which a Sentinel
    first names ``new_primary`` the primary (every 20 ms, from the test: the
    Sentinels' own log has no common clock with it)."""
    seen: list[float] = []

    def watch() -> None:
        sentinels = [redis.Redis(host="127.0.0.1", port=p, socket_timeout=0.5) for p in sentinel_ports]
        while not stop.is_set() and not seen:
            for s in sentinels:
                try:
                    _, port = s.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
                except (redis.RedisError, TypeError, ValueError):
                    continue
                if int(port) == new_primary:
                    seen.append(time.monotonic())
                    break
            time.sleep(0.02)

    threading.Thread(target=watch, daemon=True).start()
    return seen


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[list[Proc], list[int], int]]:
    primary_port, replica_port = free_port(), free_port()
    sentinel_ports = [free_port() for _ in range(3)]
    procs = [_redis(tmp_path, "primary", primary_port),
             _redis(tmp_path, "replica", replica_port, "--replicaof", "127.0.0.1", str(primary_port))]
    try:
        for port in (primary_port, replica_port):
            wait_for(lambda p=port: _pings(p), 10, f"redis on {port}")  # type: ignore[misc]
        procs += [_sentinel(tmp_path, p, primary_port) for p in sentinel_ports]
        for port in sentinel_ports:
            wait_for(lambda p=port: _pings(p), 10, f"sentinel on {port}")  # type: ignore[misc]
        def ready() -> bool:  # each Sentinel sees the replica and the two others
            infos = [redis.Redis(host="127.0.0.1", port=p).info("sentinel")["master0"] for p in sentinel_ports]
            return all(i["slaves"] == 1 and i["sentinels"] == 3 for i in infos)

        wait_for(ready, 30, "sentinels see the replica and each other")
        yield procs, sentinel_ports, primary_port, replica_port
    finally:
        for p in procs:
            p.kill()


def test_primary_killed_under_load(cluster: tuple[list[Proc], list[int], int, int]) -> None:
    procs, sentinel_ports, primary_port, replica_port = cluster
    env = {"LLMQ_REDIS_SENTINELS": ",".join(f"127.0.0.1:{p}" for p in sentinel_ports),
           "LLMQ_REDIS_SENTINEL_MASTER": MASTER, "LLMQ_REDIS_URL": "redis://127.0.0.1:1/0",  # unused but for the db
           "LLMQ_HEARTBEAT_INTERVAL_S": "0.5", "LLMQ_HEARTBEAT_TTL_S": "2", "LLMQ_REGISTRY_CACHE_S": "0.2",
           "LLMQ_FIRST_EVENT_TIMEOUT_S": "60", "LLMQ_EVENT_TIMEOUT_S": "30"}
    api, base = start_api(env, name="api-sentinel")
    worker = start_worker(env, "worker-sentinel")  # 16 slots, as the README starts it
    flower_port = free_port()
    flower = spawn("flower-sentinel", [sys.executable, "-m", "celery", "-A", "broker.app", "flower",
                                       f"--port={flower_port}", "--address=127.0.0.1", "--basic-auth=admin:pw"], env)
    # (sent, started, ended, outcome): a stream starts once a worker has started its job, a whole answer at its
    # end. Half the clients stream at any time (they fail and retry in step during the failover).
    outcomes: list[tuple[float, float, float, str]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(timeout=REQUEST_TIMEOUT_S) as http:
            n = 0
            while not stop.is_set():
                n += 1
                sent = time.monotonic()
                started = float("inf")
                try:
                    with http.stream("POST", f"{base}/v1/chat/completions", json={
                            "model": DEMO_MODEL, "max_tokens": 12, "temperature": 0, "stream": (n + i) % 2 == 0,
                            "messages": [{"role": "user", "content": f"Client {i}, request {n}."}]}) as r:
                        started = time.monotonic()
                        body = r.read().decode()
                    outcome = str(r.status_code)
                    if r.status_code == 200 and '"error"' in body:  # a stream that ended with an error event
                        outcome = "200+error_event"
                except httpx.TimeoutException:
                    outcome = "hang"
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                with lock:
                    outcomes.append((sent, started, time.monotonic(), outcome))
                if outcome != "200":
                    time.sleep(0.2)

    try:
        wait_model(base, DEMO_MODEL, worker, 180)
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        # Killed once requests flow: a fresh worker's first steps are slow on a busy machine.
        wait_for(lambda: sum(o[-1] == "200" for o in list(outcomes)) >= CLIENTS, 240, "requests answered")
        time.sleep(2)
        primary = next(p for p in procs if p.name == f"primary-{primary_port}")
        promoted_at = _promotion_watch(sentinel_ports, replica_port, stop)
        killed, killed_at = time.monotonic(), time.time()
        primary.kill()
        wait_for(lambda: bool(promoted_at), PROMOTED_WITHIN_S, "the Sentinels promote the replica")
        promoted = promoted_at[0]
        # Requests sent from BACK_WITHIN_S after the promotion on, answered (each takes seconds on a busy machine).
        wait_for(lambda: sum(o[0] >= promoted + BACK_WITHIN_S for o in list(outcomes)) >= CLIENTS,
                 3 * REQUEST_TIMEOUT_S, "requests sent after the failover answered")
        stop.set()
        for t in threads:
            t.join(timeout=REQUEST_TIMEOUT_S + 10)
        assert not any(t.is_alive() for t in threads), "a client never got an answer"

        before = Counter(o for s, _, e, o in outcomes if e < killed)
        around = Counter(o for s, _, e, o in outcomes if s < killed <= e)
        after = sorted((s - promoted, b - promoted, e - promoted, o) for s, b, e, o in outcomes if s >= killed)
        back = min((b for _, b, _, o in after if o == "200"), default=float("inf"))
        print(f"before the kill: {dict(before)}; in flight at the kill: {dict(around)}; "
              f"after: {dict(Counter(o for *_, o in after))}")
        print(f"failover: promotion {promoted - killed:.2f} s after the kill; service back {back:.2f} s after "
              f"the promotion (a worker started a request sent after the kill)")
        assert before["200"] > 0 and set(before) == {"200"}
        assert "hang" not in around
        # Sent after the kill: refused (503) until the service is back, never left to time out (504, hang).
        assert {o for *_, o in after} <= {"200", "503"}, Counter(o for *_, o in after)
        assert back < BACK_WITHIN_S, back
        # Back for good: every request sent from BACK_WITHIN_S after the promotion on succeeds.
        late = [(round(s, 2), o) for s, _, _, o in after if s >= BACK_WITHIN_S]
        assert {o for _, o in late} == {"200"}, [x for x in late if x[1] != "200"]
        # Flower, too, follows the new primary: it shows jobs that went through it.
        def flower_shows_new_jobs() -> bool:
            r = httpx.get(f"http://127.0.0.1:{flower_port}/api/tasks", auth=("admin", "pw"), timeout=10)
            return r.status_code == 200 and any((t.get("received") or 0) > killed_at for t in r.json().values())

        wait_for(flower_shows_new_jobs, 30, "flower shows jobs received after the failover")
    finally:
        stop.set()
        for p in (flower, worker, api):
            p.kill()
