"""The command line: real runs on shared media, and bad input gives one clear line and a non-zero exit."""
from __future__ import annotations

import json
import subprocess
import sys

from engine.messages import validate_message

from conftest import ROOT, media_path


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "engine.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def assert_clean_error(res, *fragments):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("facestream: error:")
    for frag in fragments:
        assert frag in lines[0], lines[0]


def test_track_image_writes_jsonl_and_overlay_png(tmp_path):
    img = media_path("d3d_000002.jpg")
    res = run_cli("track", img, "--out", tmp_path, "--landmarks")
    assert res.returncode == 0, res.stderr
    msgs = [json.loads(ln) for ln in (tmp_path / "coefficients.jsonl").read_text().splitlines()]
    assert len(msgs) == 1 and msgs[0]["face"] is True
    validate_message(msgs[0])
    assert (tmp_path / "overlay" / "d3d_000002.png").is_file()


def test_track_video_writes_overlay_mp4(tmp_path):
    import av

    video = media_path("pcavs_vox_620900105.mp4")
    res = run_cli("track", video, "--out", tmp_path)
    assert res.returncode == 0, res.stderr
    msgs = [json.loads(ln) for ln in (tmp_path / "coefficients.jsonl").read_text().splitlines()]
    with av.open(str(tmp_path / "overlay.mp4")) as c:
        n_overlay = sum(1 for _ in c.decode(video=0))
    assert n_overlay == len(msgs) > 0
    assert [m["frame"] for m in msgs] == list(range(len(msgs)))


def test_track_folder_of_images(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("d3d_000002.jpg", "fr_kit_with_rose.jpg"):
        (src / name).write_bytes(media_path(name).read_bytes())
    res = run_cli("track", src, "--out", tmp_path / "out", "--no-overlay")
    assert res.returncode == 0, res.stderr
    msgs = [json.loads(ln) for ln in (tmp_path / "out" / "coefficients.jsonl").read_text().splitlines()]
    assert len(msgs) == 2 and all(m["face"] for m in msgs)


def test_missing_file_is_a_clear_error(tmp_path):
    assert_clean_error(run_cli("track", tmp_path / "nope.mp4", "--out", tmp_path / "o"), "no such file")


def test_not_a_video_is_a_clear_error(tmp_path):
    bad = tmp_path / "notes.mp4"
    bad.write_text("this is not a video\n" * 100)
    assert_clean_error(run_cli("track", bad, "--out", tmp_path / "o"), "notes.mp4")


def test_zero_length_video_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    assert_clean_error(run_cli("track", empty, "--out", tmp_path / "o"), "empty.mp4")


def test_corrupt_video_stream_is_a_clear_error(tmp_path):
    data = bytearray(media_path("liveportrait_d0.mp4").read_bytes())
    # keep the container header, destroy the coded frames
    for i in range(4096, len(data), 7):
        data[i] = (data[i] * 31 + 17) % 256
    bad = tmp_path / "corrupt.mp4"
    bad.write_bytes(bytes(data))
    res = run_cli("track", bad, "--out", tmp_path / "o", "--no-overlay")
    if res.returncode == 0:
        # FFmpeg concealed the damage: the run must then still have produced valid messages
        msgs = [json.loads(ln) for ln in (tmp_path / "o" / "coefficients.jsonl").read_text().splitlines()]
        assert msgs
        for m in msgs:
            validate_message(m)
    else:
        assert_clean_error(res, "corrupt.mp4")


def test_bad_image_is_a_clear_error(tmp_path):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    assert_clean_error(run_cli("track", bad, "--out", tmp_path / "o"), "photo.jpg")


def test_bench_json_last_line(tmp_path):
    res = run_cli("bench", media_path("liveportrait_d0.mp4"), "--frames", "20", "--detect-every", "5", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["fps"] > 0 and out["backend"] and out["machine"]
    for stage in ("decode", "detect", "landmarks", "regress", "total"):
        assert {"median_ms", "p95_ms", "max_ms"} <= set(out["stages"][stage]), stage
        assert out["stages"][stage]["max_ms"] >= out["stages"][stage]["p95_ms"]


def test_assets_check_lists_required_assets():
    res = run_cli("assets", "check")
    assert "ict_facekit/ict_face_model.npz" in res.stdout
    assert res.returncode in (0, 1)
