"""Fan-out of coefficient messages to WebSocket subscribers (`/ws`), all sessions or one.

Each subscriber has a short queue; a subscriber that cannot keep up loses its oldest messages, never
slows the tracker or the other subscribers."""
from __future__ import annotations

import asyncio

QUEUE_LENGTH = 8


class Subscriber:
    def __init__(self, session: str | None):
        self.session = session  # None: every session
        self.queue: asyncio.Queue[str] = asyncio.Queue(QUEUE_LENGTH)
        self.dropped = 0

    def offer(self, text: str) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(text)


class MessageHub:
    def __init__(self):
        self.subscribers: set[Subscriber] = set()

    def subscribe(self, session: str | None = None) -> Subscriber:
        sub = Subscriber(session)
        self.subscribers.add(sub)
        return sub

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)

    def publish(self, session: str, text: str) -> None:
        for sub in self.subscribers:
            if sub.session is None or sub.session == session:
                sub.offer(text)
