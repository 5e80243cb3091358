"""The Redis client, configured in one place: the shared rate budget and the audit head.

The client is imported when a client is made, not with this module: it costs about
6 MiB of RSS that a proxy without Redis never needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redis.asyncio import Redis

TIMEOUT_SECONDS = 2.0


def connect(url: str, timeout: float = TIMEOUT_SECONDS) -> Redis:
    """A client of the Redis at `url` (`redis://`, `rediss://` or `unix://`); it connects
    on first use, and each command fails with a `RedisError` after `timeout` seconds."""
    from redis.asyncio import Redis

    # Without these, redis-py waits for a Redis that stopped answering for ever, and with
    # it every request that spends from the budget; with them the budget falls back to
    # its own window and the audit head is published again later.
    return Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
