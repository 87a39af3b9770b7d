"""lm-eval's tasks prepared once for the many points of a run.

At every point lm-eval's ``simple_evaluate`` would index the task YAMLs, load each task's
documents and build its requests afresh (rendering every document's prompt through its
templates), and report the environment (pip and git in subprocesses): 10 s of indexing and about
8 s of the rest a point on 2 cores for ``eval=signal`` (docs/benchmarks.md section 5), though
the documents and requests are the same at every point. :class:`TaskManagers` keeps the index,
and for each task the loaded task objects and the documents chosen (eval/general.py's
Prepared); each task object builds its requests at the first point only and at later points
hands lm-eval the same requests with their answers cleared (:func:`build_once`), through
lm-eval's ``evaluate`` (eval/general.py's _run_task). lm-eval's own request cache is not used:
it is a pickle file (a file that runs code when read) and it ignores a chosen list of
documents."""

from __future__ import annotations

import json
from collections.abc import Callable


class TaskManagers:
    """lm-eval's task index, and the tasks each prepared, once for the many points of a run."""

    def __init__(self, index_of: TaskManagers | None = None) -> None:
        """``index_of``: another one whose task index this one shares (not its tasks)."""
        self._made: dict[bool, object] = {} if index_of is None else index_of._made
        self._prepared: dict[str, object] = {}

    def get(self, defaults: bool):
        """The index of the project's tasks, with lm-eval's built-in ones if ``defaults``."""
        from lm_eval.tasks import TaskManager

        if defaults not in self._made:
            self._made[defaults] = TaskManager(include_defaults=defaults, verbosity="ERROR")
        return self._made[defaults]

    def prepared(self, key: dict, make: Callable[[], object]):
        """What lm-eval is handed for a task (eval/general.py's Prepared: its task objects,
        or its name for lm-eval to load, and the documents chosen), made by ``make`` at the
        first point with these settings (``key``: the task and whatever decides its documents
        and requests)."""
        name = json.dumps(key, sort_keys=True, default=str)
        if name not in self._prepared:
            self._prepared[name] = make()
        return self._prepared[name]


def build_once(task) -> None:
    """``task`` (an lm-eval task object) builds its requests at its first evaluation only; at
    later ones lm-eval gets the same requests with their answers cleared (fresh lists: the
    samples logged at an earlier point keep theirs)."""
    build = task.build_all_requests

    def again(**kwargs) -> None:
        instances = getattr(task, "_instances", None)  # lm-eval sets it at the first build
        if not instances:
            build(**kwargs)
            return
        for instance in instances:
            instance.resps, instance.filtered_resps = [], {}

    task.build_all_requests = again
