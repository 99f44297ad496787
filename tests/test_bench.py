"""The benchmark runs both loops side by side and reports what it measured (figures, not a timed test)."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, SMOKE, trainer_env

pytestmark = pytest.mark.slow


def test_bench_reports_ours_and_the_classic_loop(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainer.bench",
            "--config",
            str(SMOKE),
            "--steps",
            "3",
            "--warmup",
            "1",
            "--json",
            str(out),
        ],
        cwd=REPO,
        env=trainer_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["name"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"ours", "reference"}
    ours, reference = results["ours"], results["reference"]
    assert ours["steps"] == reference["steps"] == 3
    assert all(r["images_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in results.values())
    ratio = ours["images_per_s"] / reference["images_per_s"]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("ours "))
    assert f"{ratio:.2f}x" in line
    assert "machine:" in proc.stdout and "global batch 16" in proc.stdout
