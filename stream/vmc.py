"""VMC protocol sender (OSC over UDP) for VSeeFace, Warudo, VMC4U and other VRM tools, translated from
schema v1. One OSC bundle per frame:

* `/VMC/Ext/OK` (1, 3, 0, tracking) - loaded, calibrated, normal mode, tracking 1 / lost 0
* `/VMC/Ext/T` time in seconds
* `/VMC/Ext/Bone/Pos` "Head" (0, 0, 0 and the head rotation as a quaternion) in Unity's left-handed frame
* `/VMC/Ext/Blend/Val` per blendshape: the 52 ARKit "perfect sync" names with a capital first letter
  (EyeBlinkLeft, ...), then the VRM 0.x presets derived from them (Blink_L, Blink_R, A, I, U, E, O, Joy)
  for avatars without perfect sync; receivers ignore clip names their avatar lacks
* `/VMC/Ext/Blend/Apply`

Frames: the face model frame has +x at the subject's left, +y up, +z out of the face; Unity has +x at the
avatar's right, +y up, +z forward (left-handed). Reflecting x maps one onto the other, so a quaternion
(x, y, z, w) becomes (x, -y, -z, w).
"""
from __future__ import annotations

import time

from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message_builder import OscMessageBuilder

from engine.arkit import ARKIT_NAMES
from stream.udp import UdpSender

DEFAULT_PORT = 39539
PERFECT_SYNC = [n[0].upper() + n[1:] for n in ARKIT_NAMES]


def vrm0_presets(bs: dict) -> dict[str, float]:
    """A plain translation of ARKit blendshapes to VRM 0.x presets for avatars without perfect sync."""
    def clip(v: float) -> float:
        return max(0.0, min(1.0, v))

    smile = 0.5 * (bs["mouthSmileLeft"] + bs["mouthSmileRight"])
    return {
        "Blink_L": bs["eyeBlinkLeft"], "Blink_R": bs["eyeBlinkRight"],
        "A": clip(bs["jawOpen"] - 0.5 * bs["mouthFunnel"]),
        "O": clip(bs["mouthFunnel"]), "U": clip(bs["mouthPucker"]),
        "I": clip(0.5 * (bs["mouthStretchLeft"] + bs["mouthStretchRight"])),
        "E": clip(0.5 * smile * (1.0 - bs["jawOpen"])),
        "Joy": clip(smile),
    }


def unity_quat(q) -> tuple[float, float, float, float]:
    x, y, z, w = q
    return float(x), float(-y), float(-z), float(w)


def _message(address: str, *args) -> object:
    b = OscMessageBuilder(address=address)
    for a in args:
        b.add_arg(a)
    return b.build()


def encode(msg: dict, t0: float) -> bytes:
    bundle = OscBundleBuilder(IMMEDIATELY)
    face = bool(msg.get("face"))
    bundle.add_content(_message("/VMC/Ext/OK", 1, 3, 0, 1 if face else 0))
    bundle.add_content(_message("/VMC/Ext/T", float(time.monotonic() - t0)))
    if face:
        qx, qy, qz, qw = unity_quat(msg["head"]["quat"])
        bundle.add_content(_message("/VMC/Ext/Bone/Pos", "Head", 0.0, 0.0, 0.0, qx, qy, qz, qw))
        bs = msg["blendshapes"]
        for name, clip_name in zip(ARKIT_NAMES, PERFECT_SYNC):
            bundle.add_content(_message("/VMC/Ext/Blend/Val", clip_name, float(bs[name])))
        for clip_name, v in vrm0_presets(bs).items():
            bundle.add_content(_message("/VMC/Ext/Blend/Val", clip_name, float(v)))
        bundle.add_content(_message("/VMC/Ext/Blend/Apply"))
    return bundle.build().dgram


class VmcSender(UdpSender):
    """Sends one VMC OSC bundle per message to host:port."""

    def __init__(self, host: str, port: int):
        super().__init__(host, port)
        self.t0 = time.monotonic()

    def encode(self, msg: dict) -> bytes:
        return encode(msg, self.t0)
