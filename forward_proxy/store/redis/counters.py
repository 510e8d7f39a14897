"""The shared counters in Redis: every counter is one field of the hash `<prefix>counters`.

`incr_many` and `reset` are one MULTI/EXEC on that one hash (HINCRBY is atomic), so the increments of
every proxy on every host add up exactly. The field `meta:started_at` (HSETNX: the first writer wins) says
since when the counts run. The hash carries no TTL, so a `volatile-lru` Redis never evicts it.
"""

from __future__ import annotations

import time
from typing import Any

from forward_proxy.store.redis.connection import RedisConnection, text

_STARTED_AT = "meta:started_at"


class RedisCounterStore:
    """Counters as fields of one Redis hash: HINCRBY is atomic for every proxy on every host."""

    def __init__(self, connection: RedisConnection) -> None:
        self.connection = connection
        self.key = f"{connection.target.prefix}counters"

    def incr(self, name: str, amount: int = 1) -> None:
        self.incr_many({name: amount})

    def incr_many(self, amounts: dict[str, int]) -> None:
        """All amounts in one MULTI/EXEC; the start time is set too if nobody has (HSETNX)."""

        def add(client: Any) -> None:
            pipeline = client.pipeline(transaction=True)
            for name, amount in amounts.items():
                pipeline.hincrby(self.key, name, amount)
            pipeline.hsetnx(self.key, _STARTED_AT, repr(time.time()))
            pipeline.execute()

        self.connection.run("counter write failed", add)

    def read_all(self) -> dict[str, int]:
        values = self.connection.run("counter read failed", lambda client: client.hgetall(self.key))
        counts = {}
        for name, value in values.items():
            field = text(name)
            if not field.startswith("meta:"):
                counts[field] = int(value)
        return counts

    def started_at(self) -> float:
        def read(client: Any) -> float:
            pipeline = client.pipeline(transaction=True)
            pipeline.hsetnx(self.key, _STARTED_AT, repr(time.time()))
            pipeline.hget(self.key, _STARTED_AT)
            return float(pipeline.execute()[1])

        return self.connection.run("counter read failed", read)

    def reset(self) -> None:
        def clear(client: Any) -> None:
            pipeline = client.pipeline(transaction=True)
            pipeline.delete(self.key)
            pipeline.hset(self.key, _STARTED_AT, repr(time.time()))
            pipeline.execute()

        self.connection.run("counter reset failed", clear)

    def close(self) -> None:
        self.connection.close()
