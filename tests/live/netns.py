"""Run a command in a fresh network namespace with only `lo` up, so WebRTC tests cannot reach any other
address. Needs `unshare` and either root or unprivileged user namespaces."""
from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys


def netns_problem() -> str | None:
    """None when namespaces work here, else why not (the tests skip with this reason)."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "needs `unshare` (util-linux) and `ip` (iproute2)"
    probe = subprocess.run(_wrap("ip link show lo"), capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace here: {probe.stderr.strip()[:200]}"
    return None


def _wrap(inner: str) -> list[str]:
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    return ["unshare", "--net", *user, "sh", "-c", f"ip link set lo up && {inner}"]


def run_isolated(args: list[str], timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python args...` inside the namespace; returns the completed process (output captured)."""
    inner = "exec " + " ".join(shlex.quote(a) for a in [sys.executable, *args])
    return subprocess.run(_wrap(inner), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def run_scenario(script, out, timeout: float = 420):
    """Run a tests/live scenario script (args: OUT) in the namespace; skips the calling test where
    namespaces cannot be made, fails it with the scenario's output when the script fails."""
    import pytest

    reason = netns_problem()
    if reason:
        pytest.skip(reason)
    proc = run_isolated([str(script), str(out)], timeout=timeout)
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
