"""Tables and plots from a folder of bench results (``sensitune report results/``).

Reads the grid manifest ``bench.json`` written by :mod:`sensitune.bench.runner` and the
``results.json`` of every finished cell, then writes:

- ``report.md``: per-task accuracy (mean ± std over seeds), group means, the mean of the
  group means and the mean over tasks (both labelled, since papers use either), and a cost
  table (trainable parameters with and without the head, bytes on disk, training time, peak
  memory, images/s);
- ``accuracy.csv``, ``costs.csv`` and ``cells.csv`` (one row per run) with the same numbers;
- ``acc_vs_params.png``, ``acc_vs_bytes.png`` (log x, Pareto front marked), ``groups.png``
  (per-group bars) and the sensitivity heat maps of scored runs (``heatmaps/``).

Accuracy is in percent throughout. Aggregates are computed from per-task means; their ± is
the spread over seeds of the per-seed aggregate, given only when every seed finished every task.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from sensitune.io import atomic_write_bytes, atomic_write_text

MEAN_OF_GROUPS = "mean of group means"
MEAN_OF_TASKS = "mean over tasks"


@dataclass
class Cell:
    """One finished (task, method, seed) run, normalised from its results.json."""

    task: str
    group: str
    method: str
    seed: int
    accuracy: float  # percent
    params: int | None = None  # trainable, head included
    params_no_head: int | None = None
    bytes: int | None = None  # delta on disk
    bytes_no_head: int | None = None  # plan estimate without the head
    train_seconds: float | None = None
    cpu_seconds: float | None = None  # the whole cell's CPU time (bench records it per process)
    peak_memory_mb: float | None = None
    images_per_s: float | None = None
    lr: float | None = None
    run: str = ""
    scores: str | None = None  # scores file of a scored run (for the heat maps)
    diverged: str | None = None  # why the run counts as diverged (its accuracy is no result)
    fallback_from: float | None = None  # the chosen lr, when this run is the fall-back from it


@dataclass
class MethodSummary:
    """Everything the tables say about one method."""

    method: str
    task_mean: dict[str, float] = field(default_factory=dict)
    task_std: dict[str, float | None] = field(default_factory=dict)
    group_mean: dict[str, float | None] = field(default_factory=dict)
    group_std: dict[str, float | None] = field(default_factory=dict)
    mean_of_groups: float | None = None
    mean_of_groups_std: float | None = None
    mean_of_tasks: float | None = None
    mean_of_tasks_std: float | None = None
    costs: dict[str, float | None] = field(default_factory=dict)
    seeds: int = 0
    missing: list[str] = field(default_factory=list)
    # half-widths of the confidence interval over seeds (None: fewer than two seeds)
    task_ci: dict[str, float | None] = field(default_factory=dict)
    mean_of_groups_ci: float | None = None
    mean_of_tasks_ci: float | None = None
    fallback_tasks: list[str] = field(default_factory=list)
    per_seed: dict[str, dict[int, float]] = field(default_factory=dict)  # task -> seed -> accuracy


COST_COLUMNS = [
    ("params", "trainable params (with head)"),
    ("params_no_head", "trainable params (no head)"),
    ("bytes", "bytes on disk"),
    ("bytes_no_head", "bytes without head"),
    ("train_seconds", "training time (s)"),
    ("cpu_seconds", "cell CPU time (s)"),
    ("peak_memory_mb", "peak memory (MB)"),
    ("images_per_s", "images/s"),
]


# ---------------------------------------------------------------------------------------------
# reading


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def cell_from_results(results: dict[str, Any], *, task: str, group: str, method: str, seed: int,
                      run: str = "") -> Cell:
    """Normalise one engine ``results.json`` (accuracy already in percent) into a :class:`Cell`.

    Bytes are the delta folder's real size on disk when the engine saved one, else the plan's
    estimate; a scored run's ``scores.safetensors`` feeds the heat maps.
    """
    acc = results.get("accuracy")
    if acc is None:
        raise ValueError(f"{run or 'results'}: results.json has no 'accuracy'")
    size = results.get("delta_bytes_on_disk", results.get("bytes_estimate"))
    return Cell(
        task=task, group=group, method=method, seed=int(seed), accuracy=float(acc),
        params=_int(results.get("trainable_params")),
        params_no_head=_int(results.get("trainable_params_without_head")),
        bytes=_int(size), bytes_no_head=_int(results.get("bytes_estimate_without_head")),
        train_seconds=_num(results.get("train_seconds")),
        peak_memory_mb=_num(results.get("peak_memory_mb")),
        images_per_s=_num(results.get("images_per_s")),
        lr=_num(results.get("lr")),
        run=run, scores="scores.safetensors",
        diverged=(str(results.get("divergence") or "diverged") if results.get("diverged") else None),
    )


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def load_cells(folder: str | Path) -> tuple[dict[str, Any], list[Cell]]:
    """The manifest and every finished cell of a bench folder."""
    folder = Path(folder)
    manifest_path = folder / "bench.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{folder} is not a bench results folder: {manifest_path} is missing "
                                f"(make one with `sensitune bench ... --out {folder}`)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{manifest_path}: not valid JSON ({exc})") from None
    cells = []
    for entry in manifest.get("cells", []):
        path = folder / entry["path"] / "results.json"
        if not path.is_file():
            continue
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        cell = cell_from_results(results, task=entry["task"], group=entry["group"], method=entry["method"],
                                 seed=entry["seed"], run=entry["path"])
        cell.cpu_seconds = (manifest.get("cpu_seconds") or {}).get(entry["path"])
        cell.fallback_from = entry.get("fallback_from")
        if cell.scores and not Path(cell.scores).is_absolute():
            cell.scores = str(folder / entry["path"] / cell.scores)
        cells.append(cell)
    return manifest, cells


# ---------------------------------------------------------------------------------------------
# arithmetic


def _std(values: Sequence[float]) -> float | None:
    """Sample standard deviation (n - 1); None for fewer than two values."""
    return float(np.std(values, ddof=1)) if len(values) >= 2 else None


def ci_half_width(values: Sequence[float], level: float = 0.95) -> float | None:
    """Half-width of the two-sided Student-t confidence interval of the mean; None below 2 values."""
    if len(values) < 2:
        return None
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values)))


def summarize(cells: Iterable[Cell], tasks: Sequence[tuple[str, str]],
              methods: Sequence[str] | None = None, ci: float = 0.95) -> list[MethodSummary]:
    """Per-method accuracy and cost summary over the suite ``tasks`` [(task, group)].

    Group means average the per-task means (over seeds) of the tasks in the group; an
    aggregate is None when the method misses a task it covers. A diverged run is no result:
    it is left out, so its task counts as missing unless another seed finished. ``ci``: the
    level of the intervals over seeds (Student t on the per-seed values).
    """
    cells = [c for c in cells if not c.diverged]
    order = list(methods) if methods else list(dict.fromkeys(c.method for c in cells))
    groups = list(dict.fromkeys(g for _, g in tasks))
    out = []
    for method in order:
        mine = [c for c in cells if c.method == method]
        s = MethodSummary(method=method)
        seeds = sorted({c.seed for c in mine})
        s.seeds = len(seeds)
        by_task: dict[str, dict[int, float]] = {}
        for c in mine:
            by_task.setdefault(c.task, {})[c.seed] = c.accuracy
            if c.fallback_from is not None and c.task not in s.fallback_tasks:
                s.fallback_tasks.append(c.task)
        s.per_seed = by_task
        for task, _ in tasks:
            accs = list(by_task.get(task, {}).values())
            if accs:
                s.task_mean[task] = float(np.mean(accs))
                s.task_std[task] = _std(accs)
                s.task_ci[task] = ci_half_width(accs, ci)
            else:
                s.missing.append(task)
        for g in groups:
            members = [t for t, gg in tasks if gg == g]
            s.group_mean[g] = (float(np.mean([s.task_mean[t] for t in members]))
                               if all(t in s.task_mean for t in members) else None)
        complete = not s.missing and bool(tasks)
        if complete:
            s.mean_of_groups = float(np.mean([s.group_mean[g] for g in groups]))
            s.mean_of_tasks = float(np.mean([s.task_mean[t] for t, _ in tasks]))
        # spread over seeds: only seeds that finished every task of the suite
        full_seeds = [sd for sd in seeds if all(sd in by_task.get(t, {}) for t, _ in tasks)]
        if complete and len(full_seeds) >= 2:
            per_seed_groups = {g: [float(np.mean([by_task[t][sd] for t, gg in tasks if gg == g])) for sd in full_seeds]
                               for g in groups}
            for g in groups:
                s.group_std[g] = _std(per_seed_groups[g])
            seed_mog = [float(np.mean([per_seed_groups[g][i] for g in groups])) for i in range(len(full_seeds))]
            seed_mot = [float(np.mean([by_task[t][sd] for t, _ in tasks])) for sd in full_seeds]
            s.mean_of_groups_std, s.mean_of_groups_ci = _std(seed_mog), ci_half_width(seed_mog, ci)
            s.mean_of_tasks_std, s.mean_of_tasks_ci = _std(seed_mot), ci_half_width(seed_mot, ci)
        for key, _ in COST_COLUMNS:
            vals = [getattr(c, key) for c in mine if getattr(c, key) is not None]
            s.costs[key] = float(np.mean(vals)) if vals else None
        out.append(s)
    return out


def pareto_front(xs: Sequence[float], ys: Sequence[float]) -> list[bool]:
    """Which points no other point dominates (x no larger and y no smaller, one strictly).

    Lower x (parameters, bytes) and higher y (accuracy) are better; duplicates of a front
    point are on the front too.
    """
    flags = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        dominated = any((xj <= x and yj >= y and (xj < x or yj > y)) for j, (xj, yj) in enumerate(zip(xs, ys)) if j != i)
        flags.append(not dominated)
    return flags


# ---------------------------------------------------------------------------------------------
# formatting


def fmt_acc(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "—"
    return f"{mean:.1f} ± {std:.1f}" if std is not None else f"{mean:.1f}"


def fmt_count(value: float | None) -> str:
    """Human count: 1234 -> 1.23k, 2.5e6 -> 2.50M."""
    if value is None:
        return "—"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= div:
            return f"{value / div:.2f}{suffix}"
    return f"{value:.0f}"


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "—"
    for div, suffix in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if value >= div:
            return f"{value / div:.1f} {suffix}"
    return f"{value:.0f} B"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def accuracy_table(summaries: Sequence[MethodSummary], tasks: Sequence[tuple[str, str]],
                   spread: str = "ci") -> tuple[list[str], list[list[str]]]:
    """Accuracy per task, group and overall; ± is the confidence interval's half-width over seeds
    (``spread="ci"``) or their standard deviation (``"std"``); † marks a task whose runs fell back
    to the next lr because the chosen one diverged."""
    if spread not in ("ci", "std"):
        raise ValueError(f"spread {spread!r}: choose 'ci' or 'std'")
    groups = list(dict.fromkeys(g for _, g in tasks))
    header = ["method"] + [t for t, _ in tasks] + [f"{g} mean" for g in groups] + [MEAN_OF_GROUPS, MEAN_OF_TASKS]
    rows = []
    for s in summaries:
        task_spread = s.task_ci if spread == "ci" else s.task_std
        mog = s.mean_of_groups_ci if spread == "ci" else s.mean_of_groups_std
        mot = s.mean_of_tasks_ci if spread == "ci" else s.mean_of_tasks_std
        rows.append([s.method]
                    + [fmt_acc(s.task_mean.get(t), task_spread.get(t)) + ("†" if t in s.fallback_tasks else "")
                       for t, _ in tasks]
                    + [fmt_acc(s.group_mean.get(g), None if spread == "ci" else s.group_std.get(g)) for g in groups]
                    + [fmt_acc(s.mean_of_groups, mog), fmt_acc(s.mean_of_tasks, mot)])
    return header, rows


@dataclass
class PairedDifference:
    """``method`` − ``reference`` on the same seeds: per task and for the mean over tasks."""

    method: str
    reference: str
    task: dict[str, tuple[float, float | None, int]] = field(default_factory=dict)  # mean, ci half-width, seeds
    mean_of_tasks: tuple[float, float | None, int] | None = None


def paired_differences(summaries: Sequence[MethodSummary], tasks: Sequence[tuple[str, str]], reference: str,
                       ci: float = 0.95) -> list[PairedDifference]:
    """Per-seed differences against ``reference`` (same task, same seed), averaged with a t-interval:
    pairing removes what two runs of one seed share (data order, head init), so a gap is judged
    against the spread of the differences, not of each column."""
    ref = next((s for s in summaries if s.method == reference), None)
    if ref is None:
        return []
    out = []
    for s in summaries:
        if s.method == reference:
            continue
        d = PairedDifference(s.method, reference)
        per_seed_task: dict[int, dict[str, float]] = {}
        for t, _ in tasks:
            mine, theirs = s.per_seed.get(t, {}), ref.per_seed.get(t, {})
            diffs = [mine[sd] - theirs[sd] for sd in sorted(set(mine) & set(theirs))]
            for sd in sorted(set(mine) & set(theirs)):
                per_seed_task.setdefault(sd, {})[t] = mine[sd] - theirs[sd]
            if diffs:
                d.task[t] = (float(np.mean(diffs)), ci_half_width(diffs, ci), len(diffs))
        whole = [float(np.mean(list(v.values()))) for v in per_seed_task.values() if len(v) == len(tasks)]
        if whole:
            d.mean_of_tasks = (float(np.mean(whole)), ci_half_width(whole, ci), len(whole))
        out.append(d)
    return out


def fmt_diff(value: tuple[float, float | None, int] | None) -> str:
    """``+1.2 ± 0.8*``: the star marks an interval that excludes zero."""
    if value is None:
        return "—"
    mean, half, _ = value
    if half is None:
        return f"{mean:+.1f}"
    return f"{mean:+.1f} ± {half:.1f}" + ("*" if abs(mean) > half else "")


def difference_table(diffs: Sequence[PairedDifference], tasks: Sequence[tuple[str, str]]) -> tuple[list[str], list[list[str]]]:
    header = ["method"] + [t for t, _ in tasks] + [MEAN_OF_TASKS]
    rows = [[f"{d.method} − {d.reference}"] + [fmt_diff(d.task.get(t)) for t, _ in tasks] + [fmt_diff(d.mean_of_tasks)]
            for d in diffs]
    return header, rows


def cost_table(summaries: Sequence[MethodSummary]) -> tuple[list[str], list[list[str]]]:
    header = ["method"] + [label for _, label in COST_COLUMNS]
    rows = []
    for s in summaries:
        c = s.costs
        rows.append([s.method, fmt_count(c["params"]), fmt_count(c["params_no_head"]), fmt_bytes(c["bytes"]),
                     fmt_bytes(c["bytes_no_head"]),
                     "—" if c["train_seconds"] is None else f"{c['train_seconds']:.1f}",
                     "—" if c["cpu_seconds"] is None else f"{c['cpu_seconds']:.0f}",
                     "—" if c["peak_memory_mb"] is None else f"{c['peak_memory_mb']:.0f}",
                     "—" if c["images_per_s"] is None else f"{c['images_per_s']:.0f}"])
    return header, rows


def _csv_text(header: list[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None else v for v in r])
    return buf.getvalue()


def _r(v: float | None, nd: int = 2) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else round(v, nd)


# ---------------------------------------------------------------------------------------------
# plots


def _new_figure(width: float = 6.4, height: float = 4.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_tradeoff(summaries: Sequence[MethodSummary], key: str, xlabel: str, path: Path,
                  title: str = "") -> Path | None:
    """Accuracy (mean over tasks) against a cost on a log axis, Pareto front marked."""
    pts = [(s.method, s.costs.get(key), s.mean_of_tasks) for s in summaries]
    pts = [(m, x, y) for m, x, y in pts if x is not None and y is not None and x > 0]
    if not pts:
        return None
    xs, ys = [p[1] for p in pts], [p[2] for p in pts]
    front = pareto_front(xs, ys)
    fig = _new_figure()
    ax = fig.add_subplot(111)
    ax.set_xscale("log")
    ax.scatter([x for x, f in zip(xs, front) if not f], [y for y, f in zip(ys, front) if not f],
               c="tab:gray", s=36, label="dominated", zorder=3)
    ax.scatter([x for x, f in zip(xs, front) if f], [y for y, f in zip(ys, front) if f],
               c="tab:red", s=60, marker="*", label="Pareto front", zorder=4)
    fx = sorted((x, y) for x, y, f in zip(xs, ys, front) if f)
    ax.step([p[0] for p in fx], [p[1] for p in fx], where="post", c="tab:red", lw=1, alpha=0.6, zorder=2)
    for m, x, y in pts:
        ax.annotate(m, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xlabel + " (log scale)")
    ax.set_ylabel(f"accuracy, {MEAN_OF_TASKS} (%)")
    ax.set_title(title or f"accuracy vs {xlabel}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_groups(summaries: Sequence[MethodSummary], groups: Sequence[str], path: Path) -> Path | None:
    """Grouped bars: one cluster per group (+ the two overall means), one bar per method."""
    cols = list(groups) + [MEAN_OF_GROUPS, MEAN_OF_TASKS]
    data = [[(s.group_mean.get(g) if g in groups else s.mean_of_groups if g == MEAN_OF_GROUPS else s.mean_of_tasks)
             for g in cols] for s in summaries]
    if not any(v is not None for row in data for v in row):
        return None
    fig = _new_figure(max(6.4, 1.2 * len(cols) + 0.25 * len(summaries) * len(cols)), 4.4)
    ax = fig.add_subplot(111)
    n = max(1, len(summaries))
    width = 0.8 / n
    xs = np.arange(len(cols))
    for i, (s, row) in enumerate(zip(summaries, data)):
        ax.bar(xs + (i - (n - 1) / 2) * width, [np.nan if v is None else v for v in row], width, label=s.method)
    ax.set_xticks(xs)
    ax.set_xticklabels(cols, fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy per group")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=min(4, n), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    return _save(fig, path)


def plot_heatmaps(cells: Sequence[Cell], folder: Path) -> list[Path]:
    """Heat maps of where the scored runs' top scores sit, drawn by :mod:`sensitune.scoring.heatmap`.

    k = the run's trainable parameters without the head (the budget its plan spent), so the
    map shows where that many top-scored entries fall. One map per (task, method): the first seed.
    """
    scored = {}
    for c in sorted(cells, key=lambda c: c.seed):
        if c.scores and Path(c.scores).is_file():
            scored.setdefault((c.task, c.method), c)
    if not scored:
        return []
    from sensitune.scoring import ScoreMap
    from sensitune.scoring.heatmap import placement, plot

    out = []
    for c in scored.values():
        scores = ScoreMap.load(c.scores)
        k = max(1, min(int(c.params_no_head or 0) or scores.numel // 200, scores.numel))
        p = placement(scores, k, scores.meta.get("tensors"))
        path = folder / "heatmaps" / f"{c.task}__{re.sub(r'[^A-Za-z0-9._=-]+', '+', c.method)}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        out.append(plot(p, path, f"{c.method} on {c.task}\ntop {k:,} of {p.total:,} scores"))
    return out


# ---------------------------------------------------------------------------------------------
# the report


def write_report(folder: str | Path, out: str | Path | None = None, *, plots: bool = True, ci: float = 0.95,
                 reference: str | None = "lora") -> dict[str, Any]:
    """Write the tables and plots of a bench folder; returns {'markdown': text, 'files': [...]}.

    ``ci``: the level of the intervals over seeds; ``reference``: the column every other is
    compared with, seed by seed (skipped when the bench has no such column)."""
    if not 0 < ci < 1:
        raise ValueError(f"ci={ci!r}: a confidence level between 0 and 1, e.g. 0.95")
    folder = Path(folder)
    out = Path(out) if out else folder
    manifest, cells = load_cells(folder)
    tasks = [(t["task"], t["group"]) for t in manifest["tasks"]]
    methods = manifest.get("methods") or list(dict.fromkeys(c.method for c in cells))
    if not cells:
        raise ValueError(f"{folder}: no finished cells yet (no results.json under it)")
    summaries = summarize(cells, tasks, methods, ci=ci)
    diffs = paired_differences(summaries, tasks, reference, ci) if reference else []
    md = _report_head(manifest, tasks, ci) + _report_tables(summaries, diffs, tasks, ci) + _report_notes(manifest, summaries, cells)
    files: list[Path] = []
    if plots:
        plot_md, files = _report_plots(summaries, cells, tasks, out)
        md += plot_md
    text = "\n".join(md).rstrip() + "\n"
    files += _write_tables(out, text, summaries, diffs, cells, tasks)
    return {"markdown": text, "files": files, "summaries": summaries, "differences": diffs}


def _report_head(manifest: dict[str, Any], tasks: Sequence[tuple[str, str]], ci: float) -> list[str]:
    groups = list(dict.fromkeys(g for _, g in tasks))
    md = [f"# Benchmark: suite `{manifest.get('suite', '?')}`, model `{manifest.get('model', '?')}`", ""]
    if manifest.get("command"):
        md += [f"Command: `{manifest['command']}`", ""]
    seeds = manifest.get("seeds", [])
    spread = (f"mean ± the half-width of the {100 * ci:g} % Student-t confidence interval over seeds {seeds} "
              f"(per task; for the overall means, over the per-seed means)" if len(seeds) >= 2 else
              f"one seed ({seeds}) per cell: no confidence interval (an interval needs at least 2 seeds), "
              f"so no gap between columns can be told from seed noise")
    lr = ("selected on " + str(manifest.get("select_eval", "val")) + f" ({manifest.get('select_scope', 'task')} scope)"
          if manifest.get("lr_grid") else "the method default unless the column label sets lr=")
    md += [f"Accuracy (%) on the final evaluation split ({manifest.get('final_eval', 'test')}), {spread}. "
           f"Learning rate: {lr}. '{MEAN_OF_GROUPS}' averages the {len(groups)} group means; "
           f"'{MEAN_OF_TASKS}' averages all {len(tasks)} tasks. Diverged runs are no result (left out).", ""]
    return md


def _report_tables(summaries: Sequence[MethodSummary], diffs: Sequence[PairedDifference],
                   tasks: Sequence[tuple[str, str]], ci: float) -> list[str]:
    md = [_md_table(*accuracy_table(summaries, tasks)), ""]
    if diffs:
        md += [f"Paired differences against `{diffs[0].reference}` (points; same task and seed; ± the "
               f"{100 * ci:g} % interval over seeds; * = the interval excludes 0):", "",
               _md_table(*difference_table(diffs, tasks)), ""]
    md += ["Costs (mean over the method's finished runs):", "", _md_table(*cost_table(summaries)), ""]
    return md


def _report_notes(manifest: dict[str, Any], summaries: Sequence[MethodSummary], cells: Sequence[Cell]) -> list[str]:
    md: list[str] = []
    missing = [(s.method, t) for s in summaries for t in s.missing]
    if missing:
        md += [f"Missing cells ({len(missing)}): " + ", ".join(f"{m}/{t}" for m, t in missing), ""]
    failed = manifest.get("failed") or {}
    if failed:
        md += ["Failed runs:", ""] + [f"- `{k}`: {v}" for k, v in sorted(failed.items())] + [""]
    diverged = dict(manifest.get("diverged") or {})
    diverged.update({c.run: c.diverged for c in cells if c.diverged})
    if diverged:
        md += ["Diverged runs (never selected, never a result):", ""]
        md += [f"- `{k}`: {v}" for k, v in sorted(diverged.items())] + [""]
    fallback = manifest.get("fallback") or {}
    if fallback:
        md += ["† Fell back to the next-ranked lr because the chosen one diverged on the final training:", ""]
        md += [f"- {k}: lr {v['from']:g} → {v['to']:g} ({v['why']})" for k, v in sorted(fallback.items())] + [""]
    selection = manifest.get("selection") or {}
    if selection:
        md += ["Learning rates chosen on validation (task/method → lr; `*` = one rate for the whole suite):", ""]
        md += [f"- {k}: {v['lr'] if isinstance(v, dict) else v}"
               + (f" (val {v.get('val_accuracy')})" if isinstance(v, dict) else "") for k, v in sorted(selection.items())]
        md += [""]
    stability = {k: v for k, v in (manifest.get("selection_stability") or {}).items() if k != "rounds"}
    if stability:
        rounds = manifest["selection_stability"].get("rounds")
        md += [f"Selection stability: the share of {rounds} paired bootstrap redraws of the validation images "
               "under which the rule picks the same lr (per task, averaged over tasks; and one rate for the suite):", "",
               _md_table(["method", "per-task rule", "suite rule"],
                         [[m, f"{v['task']:.2f}", "—" if v.get("suite") is None else f"{v['suite']:.2f}"]
                          for m, v in stability.items()]), ""]
    return md


def _report_plots(summaries: Sequence[MethodSummary], cells: Sequence[Cell], tasks: Sequence[tuple[str, str]],
                  out: Path) -> tuple[list[str], list[Path]]:
    md: list[str] = []
    files: list[Path] = []
    for key, label, name in (("params", "trainable parameters (with head)", "acc_vs_params.png"),
                             ("bytes", "bytes on disk", "acc_vs_bytes.png")):
        p = plot_tradeoff(summaries, key, label, out / name)
        if p:
            files.append(p)
            md.append(f"![accuracy vs {label}]({name})")
    p = plot_groups(summaries, list(dict.fromkeys(g for _, g in tasks)), out / "groups.png")
    if p:
        files.append(p)
        md.append("![accuracy per group](groups.png)")
    heat = plot_heatmaps(cells, out)
    files += heat
    md += [f"![{h.stem}](heatmaps/{h.name})" for h in heat]
    return md, files


def _write_tables(out: Path, text: str, summaries: Sequence[MethodSummary], diffs: Sequence[PairedDifference],
                  cells: Sequence[Cell], tasks: Sequence[tuple[str, str]]) -> list[Path]:
    groups = list(dict.fromkeys(g for _, g in tasks))
    acc_header = ["method"] + [t for t, _ in tasks] + [f"{g} mean" for g in groups] + [MEAN_OF_GROUPS, MEAN_OF_TASKS]
    acc_rows = [[s.method] + [_r(s.task_mean.get(t)) for t, _ in tasks] + [_r(s.group_mean.get(g)) for g in groups]
                + [_r(s.mean_of_groups), _r(s.mean_of_tasks)] for s in summaries]
    spread_header = ["method", "statistic"] + [t for t, _ in tasks] + [MEAN_OF_TASKS]
    spread_rows = ([[s.method, "std"] + [_r(s.task_std.get(t)) for t, _ in tasks] + [_r(s.mean_of_tasks_std)]
                    for s in summaries]
                   + [[s.method, "ci_half_width"] + [_r(s.task_ci.get(t)) for t, _ in tasks] + [_r(s.mean_of_tasks_ci)]
                      for s in summaries])
    diff_header = ["method", "reference", "task", "mean_difference", "ci_half_width", "seeds"]
    diff_rows = [[d.method, d.reference, t, _r(v[0]), _r(v[1]), v[2]]
                 for d in diffs for t, v in [*d.task.items(), *([(MEAN_OF_TASKS, d.mean_of_tasks)] if d.mean_of_tasks else [])]]
    cost_rows = [[s.method] + [_r(s.costs[k]) for k, _ in COST_COLUMNS] for s in summaries]
    cell_fields = ["task", "group", "method", "seed", "accuracy", "params", "params_no_head", "bytes", "bytes_no_head",
                   "train_seconds", "cpu_seconds", "peak_memory_mb", "images_per_s", "lr", "run", "diverged",
                   "fallback_from"]
    files = []
    for name, content in (("report.md", text),
                          ("accuracy.csv", _csv_text(acc_header, acc_rows)),
                          ("spread.csv", _csv_text(spread_header, spread_rows)),
                          ("differences.csv", _csv_text(diff_header, diff_rows)),
                          ("costs.csv", _csv_text(["method"] + [k for k, _ in COST_COLUMNS], cost_rows)),
                          ("cells.csv", _csv_text(cell_fields, ([getattr(c, f) for f in cell_fields] for c in cells)))):
        atomic_write_text(out / name, content)
        files.append(out / name)
    return files
