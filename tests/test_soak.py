"""A long stream on the default model: 10,000 edits, flat memory and time, P stays SPD.

Slow (about 20 minutes on 2 CPU cores): run with ``make test-all`` or ``pytest -m slow``.
The figures of the last run are in docs/benchmarks.md.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rlsedit_cli.runner import checkpoint
from rlsedit_cli.runner.run import run


@pytest.mark.slow
def test_ten_thousand_edits_stay_stable(make_cfg, tmp_path):
    summary = run(make_cfg("editor=rlsedit", "eval=none", "dataset.num_subjects=12000",
                           "stream.num_edits=10000", "stream.batch_size=100",
                           "measure.pre_edit=false", "measure.fluency=false",
                           "measure.retention_edits=100", "measure.retention_every=10",
                           "checkpoint.every=25"))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
            .splitlines()]
    assert len(rows) == 100 and summary["num_edits"] == 10000
    seconds = np.array([r["edit_seconds"] for r in rows])
    memory = np.array([r["memory_mb"] for r in rows])
    assert np.median(seconds[-20:]) < 1.3 * np.median(seconds[5:25])  # no growth with history
    assert memory[-1] < memory[5] * 1.1 + 50  # flat memory
    for r in rows:
        assert all(np.isfinite(v) for v in r.values() if isinstance(v, float))
    state = checkpoint.load(tmp_path / "run")["editor"]
    for P in state["P"].values():
        assert torch.equal(P, P.T) and float(torch.linalg.eigvalsh(P.double())[0]) > 0
        assert torch.isfinite(P).all()
