"""Restrict WebRTC (aioice) host candidates to 127.0.0.1, for tests and local-only use.

aioice gathers one host candidate per non-loopback interface address and skips 127.0.0.1, so two peers in
a network namespace with only `lo` up would find no candidate pair. With this restriction both peers
offer exactly 127.0.0.1, and nothing is sent to any other address (the server also runs without STUN).
The switch is process-wide because aioice reads its address list from one module function.
"""
from __future__ import annotations

import aioice.ice

_original = aioice.ice.get_host_addresses


def _loopback_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    return ["127.0.0.1"] if use_ipv4 else []


def restrict_ice_to_loopback(enabled: bool = True) -> None:
    aioice.ice.get_host_addresses = _loopback_addresses if enabled else _original


def ice_restricted_to_loopback() -> bool:
    return aioice.ice.get_host_addresses is _loopback_addresses
