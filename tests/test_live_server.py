"""The live server end to end over loopback WebRTC, in a private network namespace: real aiortc clients
stream shared face videos; the data channel, the returned video, the WebSocket, VMC and Live Link
receivers, and bad input are checked on what actually arrived (tests/live/scenario_server.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.arkit import ARKIT_NAMES
from engine.messages import validate_message
from tests.live.netns import run_scenario

SCENARIO = Path(__file__).parent / "live" / "scenario_server.py"


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    out = tmp_path_factory.mktemp("live") / "result.json"
    run_scenario(SCENARIO, out)
    return json.loads(out.read_text())


def test_networks_batched_across_sessions(live):
    stats = live["health_end"]["batching"]
    assert stats["landmarks"]["items"] >= live["a"]["face_messages"] + live["b"]["face_messages"]
    assert stats["landmarks"]["expired"] == 0 and stats["detect"]["batches"] >= 2
    assert stats["landmarks"]["max_batch"] >= 2, "two concurrent sessions never shared a batch"


def test_health_and_page(live):
    h = live["health"]
    assert h["status"] == "ok" and h["sessions"] == 0 and h["max_sessions"] == 2
    assert h["loopback_only"] is True
    assert "llvmpipe" in h["renderer"] or h["renderer"]
    assert live["page"] == {"status": 200, "has_start": True}


@pytest.mark.parametrize("case, fragment", [
    ("not_json", "JSON"), ("missing_sdp", "sdp"), ("garbage_sdp", "not SDP"), ("broken_sdp", "SDP"),
    ("no_video", "no video"), ("codec", "no video codec in common"), ("options", "style"),
    ("foreign_target", "own host or loopback"),
])
def test_bad_offers_get_400_with_a_message(live, case, fragment):
    status, body = live["bad"][case]
    assert status == 400, body
    assert fragment.lower() in body["error"].lower(), body
    assert live["sessions_after_bad"] == 0


def test_session_messages_are_schema_valid_faces(live):
    a = live["a"]
    assert a["face_messages"] >= 25, a  # 7 s of a face video at 30 fps; drops allowed on a busy 2-core machine
    for msg in a["messages_sample"]:
        validate_message(msg)
        assert msg["face"] is True and msg["session"] == a["session"]
        assert set(msg["blendshapes"]) == set(ARKIT_NAMES)
        assert msg["timing_ms"]["engine"] > 0
    assert a["unmatched"] <= 2, "every message's pts must name a frame the client sent"
    assert a["latency_ms"]["p50"] > 0


def test_returned_video_only_when_asked(live):
    assert live["a"]["video_frames"] >= 20 and live["a"]["video_sizes"] == [[640, 480]]
    assert live["b"]["video_frames"] == 0


def test_two_sessions_stay_independent(live):
    a, b = live["a"], live["b"]
    assert a["session"] != b["session"]
    assert a["sessions_seen"] == [a["session"]] and b["sessions_seen"] == [b["session"]]
    assert b["face_messages"] >= 25
    m = {s["session"]: s for s in live["during"]["metrics_after_calibration"]["sessions"]}
    assert m[a["session"]]["calibrated"]["neutral"] is True
    assert m[b["session"]]["calibrated"]["neutral"] is False
    assert m[a["session"]]["options"]["style"] == "wireframe"
    assert m[b["session"]]["options"]["style"] == "shaded"


def test_max_sessions_refused_with_503(live):
    status, body = live["during"]["third"]
    assert status == 503 and "server full" in body["error"]
    assert len(live["during"]["metrics"]["sessions"]) == 2


def test_data_channel_commands(live):
    replies = live["a"]["replies"]
    kinds = [r["type"] for r in replies]
    assert "pong" in kinds
    assert any(r["type"] == "options" and r["style"] == "wireframe" for r in replies)
    errors = [r["error"] for r in replies if r["type"] == "error"]
    assert any("style must be one of" in e for e in errors) and any("Expecting value" in e for e in errors)
    cal = [r for r in replies if r["type"] == "calibration"]
    assert cal and cal[0]["what"] == "neutral" and cal[0]["result"]["frames"] >= 3


def test_neutral_calibration_profile_over_http(live):
    status, profile = live["during"]["profile"]
    assert status == 200 and profile["format"] == "facestream-profile" and profile["neutral"] is not None
    status, body = live["during"]["bad_profile_put"]
    assert status == 400 and "session goes on" in body["error"]


def test_identity_recalibration_and_calibration_errors(live):
    status, body = live["during"]["identity"]
    assert status == 200, body
    assert body["result"]["frames"] >= 5 and 0 <= body["result"]["spread_cm"] < 1.0
    status, body = live["during"]["unknown_calibration"]
    assert status == 400 and "unknown calibration 'teeth'" in body["error"]
    assert live["during"]["no_session"][0] == 404


def test_sessions_cleaned_up(live):
    assert live["sessions_after_close"] == 0
    assert live["vanish"]["status"] == 200 and live["vanish"]["sessions_right_after"] == 1
    assert live["vanish"]["sessions_after_timeout"] == 0
    assert live["killed"]["client_said"].startswith("streaming") and live["killed"]["sessions_while_streaming"] == 1
    assert live["killed"]["sessions_after"] == 0, "a killed client's session must be closed by the stall watchdog"
    assert live["health_end"]["sessions"] == 0


def test_bad_frames_reported_to_their_session_only(live):
    tiny = live["tiny"]
    errors = [r["error"] for r in tiny["replies"] if r["type"] == "error"]
    assert errors and "at least 16x16" in errors[0]
    odd = live["odd"]
    assert odd["face_messages"] >= 10 and odd["video_sizes"] == [[321, 239]]


def test_websocket_gets_every_session(live):
    ws = live["ws"]
    assert ws["messages"] >= live["a"]["messages"] * 0.8
    assert live["a"]["session"] in ws["sessions"] and live["b"]["session"] in ws["sessions"]


def test_vmc_receiver_parses_frames(live):
    v = live["vmc"]
    assert v["packets"] >= 25 and not v["errors"]
    s = v["sample"]
    assert s["addresses"][0] == "/VMC/Ext/OK" and s["addresses"][-1] == "/VMC/Ext/Blend/Apply"
    assert {"EyeBlinkLeft", "JawOpen", "Blink_L", "A"} <= set(s["blend"])
    assert s["head"][0] == "Head" and len(s["head"]) == 8
    q = s["head"][4:8]
    assert abs(sum(c * c for c in q) - 1.0) < 1e-3


def test_livelink_receiver_parses_frames(live):
    ll = live["livelink"]
    assert ll["faces"] >= 25 and not ll["errors"]
    s = ll["sample"]
    assert s["version"] == 6 and s["subject"] == "facestream" and len(s["values"]) == 61
    assert all(0.0 <= v <= 1.0 for v in s["values"][:52])
