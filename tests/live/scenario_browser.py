"""Browser scenario, run inside a private network namespace: the README's server command
(`run_server.py --loopback-only`) and Debian's headless Chromium driven by Playwright, its fake webcam
fed with a .y4m made from a shared face video. The real page is loaded, the camera started, and what
arrives (messages, rendered video frames, page state) is written as JSON, with screenshots.

usage: scenario_browser.py OUT_DIR [--seconds S]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from engine.assets import find_asset  # noqa: E402
from tests.live.y4m import write_y4m  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--allow-loopback-in-peer-connection",
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]
STATE_JS = """() => ({
  messages: window.facestream.messages.length,
  faces: window.facestream.messages.filter(m => m.face).length,
  videoFrames: window.facestream.videoFrames,
  latency: window.facestream.state.latency.slice(-60),
  replies: window.facestream.replies,
  status: document.getElementById('status').textContent,
  fps: document.getElementById('fps').textContent,
  bar: document.querySelector('#bars .fill').style.width,
  remote: [document.getElementById('remote').videoWidth, document.getElementById('remote').videoHeight],
  last: window.facestream.messages[window.facestream.messages.length - 1],
})"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, str(REPO / "run_server.py"), "--loopback-only", "--port", str(port),
                             "--log-level", "warning"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    lines = []
    while time.monotonic() - t0 < 180:
        line = proc.stdout.readline()
        lines.append(line)
        if "serving on" in line:
            return proc
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("run_server.py did not start:\n" + "".join(lines[-30:]))


async def main(out: Path, seconds: float) -> None:
    from playwright.async_api import async_playwright

    out.mkdir(parents=True, exist_ok=True)
    y4m = out / "camera.y4m"
    write_y4m(str(find_asset("media/liveportrait_d3.mp4")), str(y4m), (640, 480), 150)
    port = free_port()
    server = start_server(port)
    res: dict = {}
    try:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=CHROMIUM_FLAGS + [f"--use-file-for-fake-video-capture={y4m}"])
            page = await browser.new_page(viewport={"width": 1400, "height": 820})
            console = []
            page.on("console", lambda m: console.append(m.text))
            await page.goto(f"http://127.0.0.1:{port}/")
            await page.click("#start")
            await page.wait_for_function("window.facestream.messages.length > 20 && window.facestream.videoFrames > 10",
                                         timeout=90_000)
            await page.click("#record")
            await asyncio.sleep(seconds / 2)
            await page.screenshot(path=str(out / "page_shaded.png"))
            await page.select_option("#style", "parts")
            await asyncio.sleep(1.5)
            await page.screenshot(path=str(out / "page_parts.png"))
            await page.select_option("#style", "wireframe")
            await page.click("#cal-neutral")
            await page.wait_for_function(
                "window.facestream.replies.some(r => r.type === 'calibration' || r.type === 'error')", timeout=30_000)
            await asyncio.sleep(1.5)
            await page.screenshot(path=str(out / "page_wireframe.png"))
            await page.click("#record")  # stop recording
            async with page.expect_download() as dl:
                await page.click("#download")
            download = await dl.value
            jsonl = out / "session.jsonl"
            await download.save_as(str(jsonl))
            res = await page.evaluate(STATE_JS)
            res["recorded_lines"] = sum(1 for line in jsonl.read_text().splitlines() if line.strip())
            res["recorded_first"] = json.loads(jsonl.read_text().splitlines()[0])
            res["console_errors"] = [c for c in console if "error" in c.lower()]
            await page.click("#stop")
            await asyncio.sleep(1.0)
            await browser.close()
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health") as r:
            res["health_after"] = json.load(r)
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        y4m.unlink(missing_ok=True)
    (out / "result.json").write_text(json.dumps(res, default=str))


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--seconds", type=float, default=4.0)
    a = ap.parse_args()
    asyncio.run(main(a.out, a.seconds))
