"""The benchmark commands run and report what docs/benchmarks.md quotes (no timing asserted)."""

from __future__ import annotations

import json

from rlsedit_cli.bench.targets import bench_targets
from rlsedit_cli.cli import main

from .conftest import TINY_BUNDLE


def test_bench_update_prints_one_line_per_editor(capsys, tmp_path):
    out = tmp_path / "bench.jsonl"
    assert main(["bench", "update", "--d-in", "48", "--d-out", "16", "--u", "4",
                 "--batches", "4", "--device", "cpu", "--out", str(out)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert [x["editor"] for x in lines] == ["rlsedit", "alphaedit", "memit"]
    assert all(x["median_ms"] > 0 for x in lines)
    assert out.read_text().count("\n") == 3


def test_bench_targets_reports_equal_targets(shipped_handle):
    row = bench_targets(shipped_handle, str(TINY_BUNDLE), batch=3, z_layer=1, steps=3, repeat=1)
    assert row["requests"] == 3 and row["repeat"] == 1
    assert row["batched_s"] > 0 and row["one_at_a_time_s"] > 0
    assert row["relative_difference"] < 1e-4
