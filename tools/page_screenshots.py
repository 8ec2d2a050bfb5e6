"""Screenshots of the live page for docs/: runs tests/live/scenario_browser.py (run_server.py + headless
Chromium with a fake webcam fed by a shared face video, in a private network namespace) and copies its
screenshots to docs/screens/.

usage: FACESTREAM_ASSETS=<assets folder> python tools/page_screenshots.py
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.live.netns import netns_problem, run_isolated  # noqa: E402


def main() -> int:
    problem = netns_problem()
    if problem:
        print(f"page_screenshots: {problem}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        proc = run_isolated([str(REPO / "tests/live/scenario_browser.py"), tmp, "--seconds", "6"], timeout=600)
        if proc.returncode != 0:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
            return 1
        dest = REPO / "docs" / "screens"
        dest.mkdir(parents=True, exist_ok=True)
        for png in sorted(Path(tmp).glob("page_*.png")):
            shutil.copy(png, dest / png.name)
            print(dest / png.name)
        res = json.loads((Path(tmp) / "result.json").read_text())
        lat = sorted(res["latency"])
        print(f"page: {res['messages']} messages ({res['faces']} with a face), {res['videoFrames']} rendered frames, "
              f"frame sent->message median {lat[len(lat) // 2]:.0f} ms" if lat else "no latency samples")
    return 0


if __name__ == "__main__":
    sys.exit(main())
