"""Fire-and-forget UDP senders for the game-engine outputs: one datagram per coefficient message."""
from __future__ import annotations

import socket


class UdpSender:
    """Subclasses say how a schema-v1 message becomes a datagram (`encode`)."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sent = 0
        self.errors = 0

    def encode(self, msg: dict) -> bytes:
        raise NotImplementedError

    def send(self, msg: dict) -> None:
        if "error" in msg:
            return
        try:
            self.sock.sendto(self.encode(msg), self.target)
            self.sent += 1
        except OSError:
            self.errors += 1  # receiver not up or buffer full: UDP drops, tracking goes on

    def close(self) -> None:
        self.sock.close()
