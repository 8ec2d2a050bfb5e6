"""Output adapters (VMC, Live Link, WebSocket hub) and offer checks, on real messages from the tracker's
message builder; no network."""
from __future__ import annotations

import asyncio
import math
import struct

import numpy as np
import pytest
from pythonosc.osc_bundle import OscBundle

from engine.arkit import ARKIT_NAMES
from engine.geometry import euler_to_matrix, matrix_to_quat
from engine.messages import FaceState, build_message, validate_message
from stream import livelink, vmc
from stream.hub import QUEUE_LENGTH, MessageHub
from stream.sdp import SdpError, check_offer
from stream.server import parse_target
from stream.session import SessionOptions


def face_message(frame=7, yaw=20.0, pitch=-10.0, roll=5.0) -> dict:
    rng = np.random.default_rng(frame)
    r = euler_to_matrix(yaw, pitch, roll)
    s = FaceState(frame=frame, pts=frame * 3000, ts_capture=1.0, face=True, score=0.9,
                  expression=rng.uniform(0, 1, 53), blendshapes=rng.uniform(0, 1, 52), rotation=r,
                  euler_deg=(yaw, pitch, roll), quat=matrix_to_quat(r), translation_cm=np.array([1.0, 2.0, 50.0]),
                  gaze_deg={"left": (3.0, -2.0), "right": (4.0, -1.0)})
    msg = build_message(s, "sess")
    validate_message(msg)
    return msg


def test_livelink_packet_layout_and_round_trip():
    msg = face_message()
    dev = "12345678-1234-1234-1234-123456789abc"
    pkt = livelink.encode(msg, dev, "Subject", fps=30)
    assert len(pkt) == 306 + len("Subject")
    assert struct.unpack_from("<I", pkt, 0)[0] == 6 and pkt[4:5] == b"$"
    d = livelink.decode(pkt)
    assert d["device_id"] == dev and d["subject"] == "Subject" and d["frame"] == 7 and d["fps"] == (30, 1)
    for name in ARKIT_NAMES:
        assert d["blendshapes"][name] == pytest.approx(msg["blendshapes"][name], abs=1e-6)
    head = msg["head"]["euler_deg"]
    assert d["values"][52:55] == pytest.approx([math.radians(head[k]) for k in ("yaw", "pitch", "roll")], abs=1e-6)
    assert d["values"][55] == pytest.approx(math.radians(msg["eyes"]["left"]["yaw"]), abs=1e-6)


def test_livelink_no_face_packet_and_malformed():
    msg = build_message(FaceState(frame=1, pts=None, ts_capture=0.0), "s")
    pkt = livelink.encode(msg, "0" * 36, "x")
    assert livelink.decode(pkt)["face"] is False
    with pytest.raises(ValueError):
        livelink.decode(livelink.encode(face_message(), "0" * 36, "x")[:-3])
    with pytest.raises(ValueError):
        livelink.decode(b"\x06\x00")


def test_vmc_bundle_contents():
    msg = face_message()
    b = OscBundle(vmc.encode(msg, t0=0.0))
    msgs = [(m.address, list(m.params)) for m in b]
    addresses = [a for a, _ in msgs]
    assert addresses[0] == "/VMC/Ext/OK" and msgs[0][1] == [1, 3, 0, 1]
    assert addresses[-1] == "/VMC/Ext/Blend/Apply"
    blend = {p[0]: p[1] for a, p in msgs if a == "/VMC/Ext/Blend/Val"}
    assert blend["EyeBlinkLeft"] == pytest.approx(msg["blendshapes"]["eyeBlinkLeft"], abs=1e-6)
    assert len([n for n in blend if n in vmc.PERFECT_SYNC]) == 52
    assert blend["Blink_R"] == pytest.approx(msg["blendshapes"]["eyeBlinkRight"], abs=1e-6)
    head = next(p for a, p in msgs if a == "/VMC/Ext/Bone/Pos")
    qx, qy, qz, qw = msg["head"]["quat"]
    assert head[0] == "Head" and head[4:] == pytest.approx([qx, -qy, -qz, qw], abs=1e-6)


def _quat_matrix(x, y, z, w):
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


@pytest.mark.parametrize("yaw, pitch, roll", [(30.0, 0.0, 0.0), (0.0, 20.0, 0.0), (-15.0, 10.0, 25.0)])
def test_vmc_unity_quaternion_is_the_x_reflected_rotation(yaw, pitch, roll):
    """Unity's frame is the model frame with x reflected (S = diag(-1, 1, 1)): the rotation a Unity
    receiver applies must be S R S, and a yaw must keep its sense for the avatar's own head."""
    r = euler_to_matrix(yaw, pitch, roll)
    s = np.diag([-1.0, 1.0, 1.0])
    assert _quat_matrix(*vmc.unity_quat(matrix_to_quat(r))) == pytest.approx(s @ r @ s, abs=1e-6)


def test_vmc_no_face_bundle_reports_lost_tracking():
    msg = build_message(FaceState(frame=1, pts=None, ts_capture=0.0), "s")
    b = OscBundle(vmc.encode(msg, 0.0))
    msgs = [(m.address, list(m.params)) for m in b]
    assert msgs[0] == ("/VMC/Ext/OK", [1, 3, 0, 0])
    assert all(a != "/VMC/Ext/Blend/Val" for a, _ in msgs)


def test_hub_drops_oldest_for_slow_subscribers():
    async def run():
        hub = MessageHub()
        everyone, only_a = hub.subscribe(), hub.subscribe("a")
        for i in range(QUEUE_LENGTH + 3):
            hub.publish("a" if i % 2 else "b", str(i))
        assert everyone.dropped == 3 and everyone.queue.qsize() == QUEUE_LENGTH
        assert [only_a.queue.get_nowait() for _ in range(only_a.queue.qsize())] == [str(i) for i in range(1, 11, 2)]
        hub.unsubscribe(everyone)
        hub.publish("b", "x")
        assert everyone.queue.qsize() == QUEUE_LENGTH
    asyncio.run(run())


@pytest.mark.parametrize("text, expected", [("127.0.0.1:9000", ("127.0.0.1", 9000)), (":9001", ("127.0.0.1", 9001)),
                                            ("10.0.0.2", ("10.0.0.2", 39539))])
def test_parse_target(text, expected):
    assert parse_target(text, 39539) == expected


@pytest.mark.parametrize("text", ["host:port", "h:70000"])
def test_parse_target_rejects(text):
    with pytest.raises(ValueError):
        parse_target(text, 1)


OFFER = """v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0\r\n\
m=video 9 UDP/TLS/RTP/SAVPF 96 97\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendrecv\r\na=rtcp-mux\r\n\
a=rtpmap:96 {c1}/90000\r\na=rtpmap:97 {c2}/90000\r\na=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n\
a=fingerprint:sha-256 00:11\r\na=setup:actpass\r\n"""


def test_check_offer_accepts_vp8_and_reads_direction():
    info = check_offer(OFFER.format(c1="VP8", c2="VP9"))
    assert info.video_codecs == ["VP8", "VP9"] and info.wants_video_back and not info.has_data_channel
    assert not check_offer(OFFER.format(c1="H264", c2="VP9").replace("sendrecv", "sendonly")).wants_video_back


@pytest.mark.parametrize("sdp, fragment", [
    (OFFER.format(c1="AV1", c2="VP9"), "no video codec in common: the offer has AV1, VP9"),
    (OFFER.format(c1="VP8", c2="VP9").replace("sendrecv", "recvonly"), "must send its camera"),
    ("hello", "not SDP"), ("v=0\r\n" + "a=x\r\n" * 20000, "at most"),
])
def test_check_offer_rejects_with_reason(sdp, fragment):
    with pytest.raises(SdpError, match=fragment):
        check_offer(sdp)


def test_session_options_validate():
    o = SessionOptions()
    o.update({"style": "parts", "avatar": False})
    assert (o.style, o.avatar) == ("parts", False)
    with pytest.raises(ValueError, match="style must be one of"):
        o.update({"style": "x"})
    with pytest.raises(ValueError, match="true or false"):
        o.update({"landmarks68": "yes"})
