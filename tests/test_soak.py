"""bench/soak.py --quick: three short "minutes" of open-loop load on two servers side by side (the shipped queue
policy and the queue timeout off), each minute's answers, refusals, latency and server memory recorded. No timing
target is asserted: the long run and its verdict are in docs/performance.md#9-hung-replicas-and-the-soak-2026-11-29."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import ROOT

from bench.soak import VARIANTS

pytestmark = pytest.mark.slow


def test_a_short_soak_reports_every_minute_of_both_variants(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "soak.py"), "--quick", "--minutes", "3", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    data = json.loads((tmp_path / "soak.json").read_text())
    assert data["capacity_per_s"] > 0 and data["minutes"] == 3
    assert set(data["rows"]) == set(VARIANTS)
    for variant, rows in data["rows"].items():
        assert [r["minute"] for r in rows] == [1, 2, 3], variant
        for r in rows:
            assert r["answered"] > 0 and r["failed"] == 0 and r["ready"], (variant, r)
            assert r["rss_mb"] > 50 and r["p99_ms"] >= r["p50_ms"] > 0, (variant, r)
        verdict = data["verdicts"][variant]
        assert verdict["p99_drift"] > 0 and verdict["rss_growth_mb"] is not None, verdict
    markdown = (tmp_path / "soak.md").read_text()
    assert all(f"#### {variant}" in markdown for variant in VARIANTS) and "server RSS MB" in markdown
