"""A run at a glance: ``summary.png``, the newest evaluation picture beside the learning curves
(the loss, log Z against its reference, the ELBO and EUBO gaps, and the task's headline metric),
drawn from the rows of ``metrics.jsonl``. One image per run, logged to MLflow when it ends."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from matplotlib.figure import Figure

SUMMARY_FILE = "summary.png"


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``; a torn last line (a crash mid-write) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def curve(rows: Iterable[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` in the rows of ``kind``, finite values only; a resumed run
    repeats steps after its checkpoint, and the newer row wins."""
    by_step: dict[int, float] = {}
    for row in rows:
        value = row.get(key)
        if (row.get("kind") == kind and isinstance(value, (int, float))
                and math.isfinite(value)):
            by_step[int(row["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def summary_figure(rows: list[dict[str, Any]], picture: Path | None, headline: str | None,
                   title: str) -> Figure:
    """The figure: ``picture`` (an evaluation's PNG) on the left, four curves on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(15, 6), dpi=100)
    grid = fig.add_gridspec(2, 4)
    ax = fig.add_subplot(grid[:, :2])
    ax.set_axis_off()
    if picture is not None and picture.is_file():
        ax.imshow(plt.imread(picture))  # titled by the task's plot itself
    else:
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center")

    def panel(position: tuple[int, int], name: str, log_scale: bool = False) -> Any:
        a = fig.add_subplot(grid[position])
        a.set_title(name, fontsize=9)
        a.set_xlabel("step", fontsize=8)
        a.tick_params(labelsize=7)
        if log_scale:
            a.set_yscale("symlog", linthresh=1e-2)
        return a

    a = panel((0, 2), "loss (train)", log_scale=True)
    a.plot(*curve(rows, "train", "loss"), ".-", ms=2, lw=1)
    a = panel((0, 3), "log Z")
    learned = curve(rows, "train", "log_z")  # every logged step; else each evaluation's
    a.plot(*(learned if len(learned[0]) > 1 else curve(rows, "eval", "log_z")), ".-", ms=2,
           lw=1, label="learned")
    a.plot(*curve(rows, "eval", "iw_log_z"), "o-", ms=3, lw=1, label="importance-weighted (eval)")
    steps, ref = curve(rows, "eval", "reference_log_z")
    if ref:
        a.axhline(ref[-1], color="k", ls="--", lw=1, label="reference")
    a.legend(fontsize=7)
    a = panel((1, 2), "ELBO / EUBO gap (eval)", log_scale=True)
    a.plot(*curve(rows, "eval", "elbo_gap"), "o-", ms=3, lw=1, label="ELBO gap")
    a.plot(*curve(rows, "eval", "eubo_gap"), "o-", ms=3, lw=1, label="EUBO gap")
    a.legend(fontsize=7)
    key = headline or "mean_log_reward"
    a = panel((1, 3), f"{key} (eval)")
    a.plot(*curve(rows, "eval", key), "o-", ms=3, lw=1, color="tab:green")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def newest_picture(output: Path, rows: list[dict[str, Any]]) -> Path | None:
    """``eval/step_<N>.png`` of the newest evaluation in ``rows``, if any."""
    steps = [int(r["step"]) for r in rows if r.get("kind") == "eval"]
    return Path(output) / "eval" / f"step_{max(steps)}.png" if steps else None


def write_summary(output: Path, headline: str | None, title: str) -> Path | None:
    """Draw ``<output>/summary.png`` from the run's ``metrics.jsonl`` and its newest evaluation
    picture (atomically: a reader never sees half an image). None when nothing is logged yet."""
    import matplotlib.pyplot as plt

    output = Path(output)
    if not (output / "metrics.jsonl").exists():
        return None
    rows = read_rows(output / "metrics.jsonl")
    fig = summary_figure(rows, newest_picture(output, rows), headline, title)
    path, tmp = output / SUMMARY_FILE, output / f".{SUMMARY_FILE}.tmp"
    try:
        fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
    tmp.replace(path)
    return path
