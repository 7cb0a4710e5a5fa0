"""The soak's short version (bench/soak.py; the README has a 20-minute
run's figures): two minutes of mixed load with a worker restarted halfway,
against a stack the script starts. It exits 1 on a lost job, a per-job key
without a TTL, or a Redis key count still growing after the warm-up."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.procs import DEMO_MODEL_DIR, ROOT

pytestmark = pytest.mark.e2e


def test_two_minute_soak_loses_nothing_and_leaks_no_keys() -> None:
    if not (DEMO_MODEL_DIR / "model.safetensors").is_file():
        pytest.fail(f"{DEMO_MODEL_DIR} is missing: run `make test` (it builds the demo model)")
    out = subprocess.run([sys.executable, "-m", "bench", "soak", "--minutes", "2", "--key-ttl-s", "30"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    print(out.stdout[-3000:])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "jobs lost: 0" in out.stdout and "per-job keys without a TTL: 0" in out.stdout
    assert "hung up" in out.stdout and "bad 400" in out.stdout and "restarting worker-1" in out.stdout
