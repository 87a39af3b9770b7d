"""The ``code_eval`` metric of HumanEval and MBPP, offline, through lm-eval's sandboxed executor.

lm-eval's humaneval and mbpp tasks score with Hugging Face's ``code_eval`` metric, which
``evaluate.load("code_eval")`` fetches from the hub when their ``utils`` module is imported. Offline
that fails, and with it the whole task. :class:`CodeEval` computes the same figure as that metric
(each candidate followed by a newline and the reference test program, run with a 3-second timeout;
pass@k by the unbiased estimator of Chen et al. 2021) with lm-eval's own sandboxed runner
(``lm_eval/tasks/cruxeval/utils.py``: a separate process, destructive functions disabled, a time
limit). :func:`offline_code_eval` hands it to lm-eval's code tasks while their configs load; the
tasks' prompts, filters and few-shot examples stay lm-eval's.

Like ``code_eval``, it refuses to run anything unless ``HF_ALLOW_CODE_EVAL=1`` (set by
eval.allow_code_execution=true, around the code tasks only).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

TIMEOUT_S = 3.0  # code_eval's default


class CodeEval:
    """``compute(references, predictions, k)`` as ``evaluate.load("code_eval")`` answers it."""

    def compute(self, references: list[str], predictions: list[list[str]],
                k: list[int] | int = (1, 10, 100), **_: object) -> tuple[dict, dict]:
        from lm_eval.tasks.cruxeval.utils import _pass_at_k, check_correctness

        if os.environ.get("HF_ALLOW_CODE_EVAL") != "1":
            raise ValueError("code_eval runs model-written code: set HF_ALLOW_CODE_EVAL=1 "
                             "(eval.allow_code_execution=true)")
        ks = [k] if isinstance(k, int) else list(k)
        results: dict[int, list[bool]] = {}
        for i, (candidates, test) in enumerate(zip(predictions, references)):
            results[i] = [bool(check_correctness(f"{c}\n{test}", timeout=TIMEOUT_S))
                          for c in candidates]
        scores = {}
        for kv in ks:
            if results and all(len(r) >= kv for r in results.values()):  # as code_eval
                per = [_pass_at_k(len(r), sum(r), kv) for r in results.values()]
                scores[f"pass@{kv}"] = float(sum(per) / len(per))
        return scores, results


@contextlib.contextmanager
def offline_code_eval() -> Iterator[None]:
    """``evaluate.load("code_eval")`` answers :class:`CodeEval` while lm-eval loads and runs
    tasks (their ``utils`` module keeps what it got at import). ``evaluate.load`` would import a
    file or folder of the metric's name from the current directory first: a bare name that
    exists there is refused instead of run."""
    import evaluate

    from rlsedit_cli.errors import DataError

    real = evaluate.load

    def load(path: str, *args, **kwargs):
        if path == "code_eval":
            return CodeEval()
        if "/" not in str(path) and Path(str(path)).exists():
            raise DataError(f"a file or folder named '{path}' in the current directory "
                            f"({Path.cwd()}) would be imported and run as lm-eval's metric "
                            f"'{path}': run rlsedit from another folder")
        return real(path, *args, **kwargs)

    evaluate.load = load
    try:
        yield
    finally:
        evaluate.load = real
