"""Live Link Face UDP sender (Unreal Engine's LiveLinkFace / ARKit source), translated from schema v1.

Packet (see docs/OUTPUTS.md): uint32 LE version 6, '$' + 36-character device UUID, int32 BE subject-name
length + UTF-8 name, int32 BE frame number, float32 BE sub-frame, int32 BE fps numerator and denominator,
uint8 count 61, then 61 float32 BE: the 52 ARKit blendshapes in ARKit order, head yaw/pitch/roll and left
and right eye yaw/pitch/roll in radians. A packet that ends after the name means "no face".
"""
from __future__ import annotations

import math
import struct
import uuid

from engine.arkit import ARKIT_NAMES
from stream.udp import UdpSender

VERSION = 6
N_VALUES = 61
DEFAULT_PORT = 11111


def encode(msg: dict, device_id: str, subject: str, fps: int = 30) -> bytes:
    if len(device_id) != 36:
        raise ValueError("device_id must be a 36-character UUID")
    name = subject.encode("utf-8")
    head = struct.pack("<I", VERSION) + b"$" + device_id.encode("ascii") + struct.pack(">i", len(name)) + name
    if not msg.get("face"):
        return head
    bs = msg["blendshapes"]
    e = msg["head"]["euler_deg"]
    left, right = msg["eyes"]["left"], msg["eyes"]["right"]
    rad = math.radians
    values = [float(bs[n]) for n in ARKIT_NAMES] + [
        rad(e["yaw"]), rad(e["pitch"]), rad(e["roll"]),
        rad(left["yaw"]), rad(left["pitch"]), 0.0,
        rad(right["yaw"]), rad(right["pitch"]), 0.0,
    ]
    return head + struct.pack(">ifii", int(msg["frame"]), 0.0, int(fps), 1) + struct.pack(
        f">B{N_VALUES}f", N_VALUES, *values)


def decode(packet: bytes) -> dict:
    """Parse one packet (the layout above); raises ValueError on a malformed one."""
    if len(packet) < 45:
        raise ValueError(f"Live Link packet too short ({len(packet)} bytes)")
    (version,) = struct.unpack_from("<I", packet, 0)
    device = packet[5:41].decode("ascii")
    (n,) = struct.unpack_from(">i", packet, 41)
    if n < 0 or 45 + n > len(packet):
        raise ValueError("Live Link subject-name length runs past the packet")
    subject = packet[45:45 + n].decode("utf-8")
    out = {"version": version, "device_id": device, "subject": subject, "face": False}
    end = 45 + n
    if len(packet) < end + 16:
        return out
    frame, sub, num, den = struct.unpack_from(">ifii", packet, end)
    (count,) = struct.unpack_from(">B", packet, end + 16)
    if len(packet) != end + 17 + 4 * count:
        raise ValueError(f"Live Link packet holds {len(packet) - end - 17} value bytes, header says {count} floats")
    values = struct.unpack_from(f">{count}f", packet, end + 17)
    out.update(face=True, frame=frame, subframe=sub, fps=(num, den), values=list(values),
               blendshapes=dict(zip(ARKIT_NAMES, values[:52])))
    return out


class LiveLinkSender(UdpSender):
    """Sends one Live Link Face packet per message to host:port."""

    def __init__(self, host: str, port: int, subject: str = "facestream", fps: int = 30):
        super().__init__(host, port)
        self.subject = subject
        self.fps = fps
        self.device_id = str(uuid.uuid4())

    def encode(self, msg: dict) -> bytes:
        return encode(msg, self.device_id, self.subject, self.fps)
