"""The client's side of one request: its body, and the moment the client leaves.

ASGI tells an app that its client left only through `receive()`, and only once the
request body has been read. `Downstream` owns that channel: the body is read through it,
and afterwards it keeps listening, so that whatever the request is waiting for at that
moment (a connection to Publer, Publer's response head, the next piece of its body) is
cancelled at once and the connection to Publer is closed, not left busy until a timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import TracebackType

from starlette.types import Receive


class ClientGone(Exception):
    """The client disconnected before its response was complete."""


class BodyTooLarge(Exception):
    """The request body grew past the configured maximum while streaming."""


class Downstream:
    """The request body, then a watch for the disconnect that cancels the request's task.

    Use as `async with downstream:` around everything the request waits for; leaving the
    block because the client left raises ClientGone, whatever was being awaited.
    """

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._body_read = asyncio.Event()
        self._task: asyncio.Task[object] | None = None
        self._watch: asyncio.Task[None] | None = None
        self.gone = False
        self._fired = False

    def no_body(self) -> None:
        """The request has no body: start listening for the disconnect at once."""
        self._body_read.set()

    async def body(self) -> AsyncIterator[bytes]:
        """The body as it arrives. Raises ClientGone or BodyTooLarge."""
        received = 0
        try:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    self.gone = True
                    raise ClientGone
                chunk: bytes = message.get("body", b"")
                received += len(chunk)
                if received > self._limit:
                    raise BodyTooLarge
                if chunk:
                    yield chunk
                if not message.get("more_body", False):
                    return
        finally:
            self._body_read.set()

    async def read_body(self) -> bytes:
        """The whole body (for small ones). Raises ClientGone or BodyTooLarge."""
        return b"".join([chunk async for chunk in self.body()])

    async def _listen(self) -> None:
        await self._body_read.wait()
        if not self.gone:
            while (await self._receive())["type"] != "http.disconnect":
                pass
            self.gone = True
        self._fired = True
        assert self._task is not None
        self._task.cancel()

    async def __aenter__(self) -> Downstream:
        self._task = asyncio.current_task()
        self._watch = asyncio.get_running_loop().create_task(self._listen())
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self._watch is not None and self._task is not None
        self._watch.cancel()
        if self._fired and self._task.uncancel() == 0:
            # Whatever was awaited when the client left was cancelled: that is the story.
            raise ClientGone from None
