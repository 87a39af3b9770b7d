"""PNG plots: retention of early edits, every metric against edits made, general ability, the
objective's terms."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rlsedit_cli.files import parse_override  # noqa: E402
from rlsedit_cli.report.runs import Run  # noqa: E402
from rlsedit_cli.report.table import METRICS  # noqa: E402

PERCENT = ("efficacy", "generalization", "specificity", "batch_efficacy", "efficacy_generated",
           "generalization_generated")  # 0..100 scales
LABELS = {"fluency": "fluency (n-gram entropy x 100)",
          "consistency": "consistency (tf-idf cosine x 100)"}


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _curve(ax, rows: list[dict], metric: str, label: str) -> None:
    """One run's ``metric`` against edits made, with its 95% interval as a band."""
    rows = [r for r in rows if isinstance(r.get(metric), (int, float))]
    if not rows:
        return
    xs, ys = [r["edits"] for r in rows], [r[metric] for r in rows]
    (line,) = ax.plot(xs, ys, marker="o", ms=3, label=label)
    half = [r.get(f"{metric}_ci95") for r in rows]
    if all(isinstance(h, (int, float)) for h in half):
        ax.fill_between(xs, [y - h for y, h in zip(ys, half)], [y + h for y, h in zip(ys, half)],
                        color=line.get_color(), alpha=0.15, lw=0)


def _axes(ax, metric: str, title: str) -> None:
    """Fixed 0-100 axes for percentages (a one-point dip must not look like a collapse)."""
    ax.set(title=title, xlabel="edits made", ylabel="%" if metric in PERCENT else
           LABELS.get(metric, metric))
    if metric in PERCENT:
        ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)


def _legend(fig, axes) -> None:
    """One legend for the figure, below the panels (never over a line)."""
    for ax in axes.flat:
        handles, labels = ax.get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="upper center", ncol=min(3, len(labels)), fontsize=7,
                       bbox_to_anchor=(0.5, 0.0))
            return


def retention_plot(runs: list[Run], out: Path) -> Path | None:
    """Efficacy and generalization of the stream's first edits against edits made."""
    runs = [r for r in runs if r.retention]
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True, squeeze=False)
    for ax, metric in zip(axes.flat, ("efficacy", "generalization")):
        for run in runs:
            _curve(ax, run.retention, metric, run.label)
        _axes(ax, metric, f"{metric} of the first edits (95% band)")
    _legend(fig, axes)
    return _save(fig, out / "retention.png")


def metrics_plot(runs: list[Run], out: Path) -> Path | None:
    """Every metric against edits made: each batch's efficacy right after its edit, and the
    retention measurements of all seven metrics (the five and the two generated ones)."""
    if not any(r.metrics for r in runs):
        return None
    fig, axes = plt.subplots(2, 4, figsize=(17, 7))
    for run in runs:
        _curve(axes[0, 0], run.metrics, "batch_efficacy", run.label)
    _axes(axes[0, 0], "batch_efficacy", "efficacy of each batch, right after its edit")
    for ax, metric in zip(axes.flat[1:], METRICS):
        for run in runs:
            _curve(ax, run.retention, metric, run.label)
        _axes(ax, metric, f"{metric} of the first edits (95% band)")
    _legend(fig, axes)
    return _save(fig, out / "metrics.png")


def general_plot(runs: list[Run], out: Path) -> Path | None:
    """General-ability scores (lm-eval) against edits made, one panel per task."""
    runs = [r for r in runs if r.general]
    if not runs:
        return None
    tasks = sorted({row["task"] for r in runs for row in r.general})
    cols = min(3, len(tasks))
    rows_n = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.3 * cols, 3.5 * rows_n), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        for run in runs:
            pts = [row for row in run.general
                   if row["task"] == task and row.get("score") is not None]
            ax.plot([p["edits"] for p in pts], [p["score"] for p in pts], marker="o", ms=3,
                    label=run.label)
        metric = next((row.get("metric") for run in runs for row in run.general
                       if row["task"] == task and row.get("metric")), None)
        ax.set(title=f"{task} ({metric})" if metric else task, xlabel="edits made")
        if "perplexity" in (metric or "") or task.endswith("wikitext"):
            ax.set_yscale("log")  # a collapse is orders of magnitude; a drift is not
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return _save(fig, out / "general.png")


TERMS = {"fit": "fitting error ||W K - V|| over all edits", "drift": "drift ||W - W0||",
         "preservation": "preservation error sqrt(tr(D C D^T))", "norm": "||W||"}


def _map_order(label: str) -> tuple[str, int]:
    """layer4 before layer10; gate maps before up maps."""
    head = label.rstrip("0123456789")
    return head, int(label[len(head):] or 0)


def _terms(rows: list[dict], name: str) -> tuple[dict[str, list], list[int]]:
    """map -> values of term ``name`` (metrics.jsonl's MAP/{name}: layer5, gate11) and the
    edits."""
    rows = [r for r in rows if any(k.endswith("/" + name) for k in r)]
    maps = sorted({k.split("/")[0] for r in rows for k in r if k.endswith("/" + name)},
                  key=_map_order)
    return {m: [r.get(f"{m}/{name}") for r in rows] for m in maps}, [r["edits"] for r in rows]


def terms_plot(runs: list[Run], out: Path) -> Path | None:
    """The paper's Figure 2 (and ||W||) against edits made: one line per edited map for one
    run; for several, one line per run with its layers taken together (the root of the sum of
    squares, the term of all edited maps at once)."""
    runs = [r for r in runs if any(k.endswith("/drift") for row in r.metrics for k in row)]
    if not runs:
        return None
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, title) in zip(axes.flat, TERMS.items()):
        for run in runs:
            per_layer, xs = _terms(run.metrics, name)
            if len(runs) == 1:
                for label, ys in per_layer.items():
                    head = label.rstrip("0123456789")
                    ax.plot(xs, ys, marker="o", ms=3, label=f"{head} {label[len(head):]}")
            elif per_layer:
                ax.plot(xs, [sum(v * v for v in vals) ** 0.5 for vals in zip(*per_layer.values())],
                        marker="o", ms=3, label=run.label)
        if all(y > 0 for line in ax.get_lines() for y in line.get_ydata()) and ax.get_lines():
            ax.set_yscale("log")
        ax.set(title=title, xlabel="edits made")
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    return _save(fig, out / "objective_terms.png")


def sweep_axes(runs: list[Run]) -> list[str]:
    """Override keys whose values differ between runs, numeric ones only (a sweep's axes)."""
    values: dict[str, set] = {}
    for run in runs:
        for o in run.overrides:
            key, value = parse_override(o)
            values.setdefault(key, set()).add(value)
    axes = []
    for key, vals in values.items():
        try:
            [float(v) for v in vals]
        except ValueError:
            continue
        if len(vals) > 1:
            axes.append(key)
    return sorted(axes)


def heatmap(runs: list[Run], out: Path, metric: str) -> Path | None:
    """``metric`` over the grid of a two-axis sweep (e.g. editor.lam x editor.mu)."""
    axes = sweep_axes(runs)
    if len(axes) != 2:
        return None
    row_key, col_key = axes
    rows = sorted({float(r.override(row_key)) for r in runs})
    cols = sorted({float(r.override(col_key)) for r in runs})
    grid = [[float("nan")] * len(cols) for _ in rows]
    for run in runs:
        value = run.summary.get(metric)
        if value is not None:
            i = rows.index(float(run.override(row_key)))
            grid[i][cols.index(float(run.override(col_key)))] = value
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 2.5, 1.0 * len(rows) + 2))
    image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    ax.set_xticks(range(len(cols)), [f"{c:g}" for c in cols])
    ax.set_yticks(range(len(rows)), [f"{r:g}" for r in rows])
    ax.set(xlabel=col_key, ylabel=row_key, title=f"{metric} over the sweep")
    for i, line in enumerate(grid):
        for j, value in enumerate(line):
            if value == value:  # not NaN
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", color="w", fontsize=8)
    fig.colorbar(image, ax=ax)
    return _save(fig, out / f"heatmap_{metric}.png")


def tradeoff_points(runs: list[Run], metric: str) -> tuple[dict[str, list], dict[str, float]]:
    """The paper's trade-off over a sweep: per general-ability task, one (``metric`` at the end,
    the task's score at the run's last general-ability point, the run's sweep values) per run;
    and each task's score before editing (the first run's point at 0 edits)."""
    axes = sweep_axes(runs)
    points: dict[str, list] = {}
    before: dict[str, float] = {}
    for run in runs:
        x = run.summary.get(metric)
        scored = [row for row in run.general if isinstance(row.get("score"), (int, float))]
        if not isinstance(x, (int, float)) or not scored:
            continue
        last = max(row["edits"] for row in scored)
        label = ", ".join(f"{key.split('.')[-1]}={run.override(key)}" for key in axes)
        for row in scored:
            if row["edits"] == 0:
                before.setdefault(row["task"], row["score"])
            if row["edits"] == last and last > 0:
                points.setdefault(row["task"], []).append((x, row["score"], label))
    return points, before


def _merged_labels(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """One label per cluster of points closer than 3% of the panel's span on both axes (runs
    whose figures coincide, e.g. every lam at a large mu), their labels joined by '; '."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    dx, dy = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    groups: list[tuple[float, float, list[str]]] = []
    for x, y, label in points:
        near = [g for g in groups if abs(g[0] - x) < 0.03 * dx and abs(g[1] - y) < 0.03 * dy]
        if near:
            near[0][2].append(label)
        else:
            groups.append((x, y, [label]))
    return [(x, y, "; ".join(labels)) for x, y, labels in groups]


def tradeoff_plot(runs: list[Run], out: Path, metric: str) -> Path | None:
    """Edit success against general ability over a sweep (e.g. editor.lam x editor.mu), one
    panel per task: each run a labelled point, the unedited model's score a dashed line."""
    if not sweep_axes(runs):
        return None
    points, before = tradeoff_points(runs, metric)
    if not points:
        return None
    tasks = sorted(points)
    cols = min(3, len(tasks))
    rows_n = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.6 * cols, 3.8 * rows_n), squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        right = max(x for x, _, _ in points[task])
        for x, y, _ in points[task]:
            ax.plot([x], [y], marker="o", ms=5, color="tab:blue")
        for x, y, label in _merged_labels(points[task]):
            near_edge = x > 0.7 * right  # its label goes left, inside the panel
            ax.annotate(label, (x, y), fontsize=6, xytext=(-3 if near_edge else 3, 3),
                        textcoords="offset points", ha="right" if near_edge else "left")
        if task in before:
            ax.axhline(before[task], ls="--", color="grey", lw=1, label="unedited")
        ax.set(title=task, xlabel=f"{metric} at the end", ylabel="score at the end")
        ys = [y for _, y, _ in points[task]] + ([before[task]] if task in before else [])
        if task.endswith("wikitext") and min(ys) > 0 and max(ys) > 10 * min(ys):
            ax.set_yscale("log")  # a collapse spans orders of magnitude
        if metric in PERCENT:
            ax.set_xlim(-2, 102)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    return _save(fig, out / f"tradeoff_{metric}.png")


def all_plots(runs: list[Run], out: Path, metric: str = "efficacy") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    made = [retention_plot(runs, out), metrics_plot(runs, out), general_plot(runs, out),
            terms_plot(runs, out), heatmap(runs, out, metric), tradeoff_plot(runs, out, metric)]
    return [p for p in made if p is not None]
