"""The real page in Debian's headless Chromium (fake webcam fed by a shared face video) against the
README's server command, in a private network namespace (tests/live/scenario_browser.py)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.messages import validate_message
from tests.live.netns import run_scenario

SCENARIO = Path(__file__).parent / "live" / "scenario_browser.py"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    if shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it: apt-get install chromium)")
    pytest.importorskip("playwright", reason="playwright (Python) drives Chromium; pip install -e .[test]")
    out = tmp_path_factory.mktemp("browser")
    run_scenario(SCENARIO, out)
    return json.loads((out / "result.json").read_text()), out


def test_page_receives_face_messages(page):
    res, _ = page
    assert res["faces"] >= 20, res["status"]
    validate_message(res["last"])
    assert res["last"]["face"] is True
    assert float(res["fps"]) > 0
    assert res["bar"].endswith("%")


def test_page_shows_returned_rendered_video(page):
    res, out = page
    assert res["videoFrames"] >= 10
    w, h = res["remote"]  # Chromium may scale its camera down when the machine is busy (CPU adaptation)
    assert 160 <= w <= 640 and abs(w / h - 4 / 3) < 0.05
    for name in ("page_shaded.png", "page_parts.png", "page_wireframe.png"):
        assert (out / name).stat().st_size > 20_000


def test_page_latency_matched_to_sent_frames(page):
    res, _ = page
    assert len(res["latency"]) >= 10, "messages could not be matched to the frames Chromium sent"
    assert all(0 < v < 5000 for v in res["latency"])


def test_page_calibrates_and_records(page):
    res, _ = page
    kinds = [r["type"] for r in res["replies"]]
    assert "calibration" in kinds, res["replies"]
    assert res["recorded_lines"] >= 10
    validate_message(res["recorded_first"])
    assert not res["console_errors"], res["console_errors"]


def test_stopping_the_page_ends_the_session(page):
    res, _ = page
    assert res["health_after"]["sessions"] == 0
