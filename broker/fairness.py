"""Fair share between API keys, where jobs are taken: in Redis.

Within one model's queue and one priority step, each key (a *tenant*) gets
its weighted share of tokens, not of requests: a virtual token counter per
tenant (VTC, Sheng et al., "Fairness in Serving Large Language Models",
OSDI 2024), and the next job goes to the waiting tenant whose counter is
lowest.

How it sits under Celery, so that workers still pull and an idle worker
never waits: the API's message does not go into kombu's list itself
(``broker/transport.py``). One script appends it to its tenant's own list
and pushes a *ticket* onto kombu's list in its place. A worker's ``BRPOP``
takes a ticket like any message, in kombu's priority order across its
queues, and one script turns it into the waiting message of the tenant with
the lowest counter. So there are as many tickets as messages, every ticket
is worth the next job of that list, and kombu, Celery and Flower see the
same lists, lengths and messages as before.

The counters, in tokens divided by the key's weight:

- a tenant is charged the job's *estimate* (``Share.estimate``: prompt
  characters / 4 plus ``n`` times ``max_tokens``) when its job is taken,
  so its jobs in flight count at once;
- the worker settles the difference to the job's real tokens (prompt plus
  completion) when the job ends (``settle``);
- a tenant that starts waiting again is lifted to the lowest counter of the
  tenants waiting (or, with none, to that of the last one served), less one
  token so that it goes next: time spent idle earns no credit to spend on a
  burst, and a key that only now asks is not put behind one that has been
  taking all along.

A message put back by kombu (a dead worker's, a rejected batch line) goes
into kombu's list as itself and is delivered as it is, ahead of fairness.
"""

from __future__ import annotations

from typing import Any

from broker.keys import KOMBU_PRIORITY_STEPS, Keys, priority_lists, queue_name
from broker.schemas import Job, Share

# What stands in kombu's list for a message kept in its tenant's list. Not
# JSON, so it can never be mistaken for a message.
TICKET = b"llmq:fair-ticket"
HEADER = "llmq-fair"  # the Celery message header that names the tenant and its charge
DEFAULT_OUTPUT_ESTIMATE = 256  # tokens, per choice of a job that gives no max_tokens
ANONYMOUS = "anonymous"  # the tenant of requests to an API without keys

# KEYS: kombu's list, the tenant's list, the waiting tenants (a sorted set by
# counter), the counters, the last served counter. ARGV: "charge|message",
# the tenant, the ticket.
_PUSH = """
redis.call('RPUSH', KEYS[2], ARGV[1])
if not redis.call('ZSCORE', KEYS[3], ARGV[2]) then
  local own = tonumber(redis.call('ZSCORE', KEYS[4], ARGV[2]) or '0')
  local least = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  local lift = tonumber(least[2] or redis.call('GET', KEYS[5]) or '0') - 1
  if lift > own then own = lift end
  redis.call('ZADD', KEYS[4], own, ARGV[2])
  redis.call('ZADD', KEYS[3], own, ARGV[2])
end
redis.call('LPUSH', KEYS[1], ARGV[3])
"""

# KEYS: the waiting tenants, the counters, the last served counter. ARGV: the
# tenant lists' common prefix. The message of the waiting tenant with the
# lowest counter (ties: the tenant's name), charged; nil if none waits.
_POP = """
while true do
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if #first == 0 then return false end
  local tenant = first[1]
  local list = ARGV[1] .. tenant
  local item = redis.call('LPOP', list)
  if item then
    local bar = string.find(item, '|', 1, true)
    redis.call('SET', KEYS[3], first[2])
    local now = redis.call('ZINCRBY', KEYS[2], tonumber(string.sub(item, 1, bar - 1)), tenant)
    if redis.call('LLEN', list) == 0 then
      redis.call('ZREM', KEYS[1], tenant)
    else
      redis.call('ZADD', KEYS[1], now, tenant)
    end
    return string.sub(item, bar + 1)
  end
  redis.call('ZREM', KEYS[1], tenant)
end
"""

# KEYS: the waiting tenants, the counters. ARGV: the tenant, the difference.
_SETTLE = """
local now = redis.call('ZINCRBY', KEYS[2], ARGV[2], ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then redis.call('ZADD', KEYS[1], now, ARGV[1]) end
"""


def is_fair_queue(queue: str) -> bool:
    """Interactive model queues are shared fairly; batch lines (their own
    queues, one priority step) and Celery's own queues are not."""
    return queue.startswith("llmq.") and queue != "llmq.default"


def step_list(queue: str, priority: int) -> str:
    """Kombu's list for ``priority`` in ``queue`` (its step: the highest at or below it)."""
    step = max(s for s in KOMBU_PRIORITY_STEPS if s <= priority)
    return priority_lists(queue)[KOMBU_PRIORITY_STEPS.index(step)]


def estimate(job: Job) -> int:
    """The tokens a job is charged when taken, settled at its end."""
    if job.messages is not None:
        chars = sum(len(m.content) if isinstance(m.content, str) else len(str(m.content)) for m in job.messages)
    elif job.inputs is not None:
        chars = sum(len(i) * (1 if isinstance(i, str) else 4) for i in job.inputs)
    else:
        chars = len(job.prompt) * (1 if isinstance(job.prompt, str) else 4) if job.prompt is not None else 0
    output = 0 if job.kind in ("embedding", "count") else job.n * (job.sampling.max_tokens or DEFAULT_OUTPUT_ESTIMATE)
    return chars // 4 + output


def header(share: Share) -> dict[str, Any]:
    """The Celery header the API sends with a fairly shared job."""
    return {"tenant": share.tenant, "charge": share.estimate / share.weight}


def push(client: Any, keys: Keys, list_name: str, message: str, fair: dict[str, Any]) -> None:
    """The API's side (under kombu's publish): the message into its tenant's list, a ticket into kombu's."""
    tenant = str(fair["tenant"])
    client.eval(_PUSH, 5, list_name, keys.fair_tenant(list_name, tenant), keys.fair_waiting(list_name),
                keys.fair_counters(list_name), keys.fair_served(list_name), f"{float(fair['charge'])!r}|{message}",
                tenant, TICKET)


def pop(client: Any, keys: Keys, list_name: str) -> bytes | None:
    """A worker's side (a ticket taken): the next message by fair share."""
    item = client.eval(_POP, 3, keys.fair_waiting(list_name), keys.fair_counters(list_name),
                       keys.fair_served(list_name), keys.fair_tenant(list_name, ""))
    return None if item is None else bytes(item)


def settle(client: Any, keys: Keys, job: Job, tokens: int) -> None:
    """A worker's side, at the job's end: its tenant's counter moves from the
    estimate it was charged to the tokens it really took."""
    if job.share is None:
        return
    list_name = step_list(job.queue or queue_name(job.model), job.priority)
    client.eval(_SETTLE, 2, keys.fair_waiting(list_name), keys.fair_counters(list_name), job.share.tenant,
                (tokens - job.share.estimate) / job.share.weight)


def counters(client: Any, keys: Keys, list_name: str) -> dict[str, float]:
    """Each tenant's counter (for the bench and tests)."""
    return {k.decode(): v for k, v in client.zrange(keys.fair_counters(list_name), 0, -1, withscores=True)}
