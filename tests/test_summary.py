"""summary.png: the newest evaluation picture beside the learning curves, from metrics.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from rtb_ray.summary import (  # noqa: E402
    curve, newest_picture, read_rows, summary_figure, write_summary,
)


def rows_of_a_resumed_run() -> list[dict]:
    """Train rows every 10 steps to 40, evaluations at 0, 20, 40; resumed from step 20, so steps
    30 and 40 were logged twice (the second time with other values)."""
    rows = [{"kind": "eval", "step": 0, "elbo_gap": 5.0, "eubo_gap": 2.0, "log_z": 0.0,
             "iw_log_z": 1.0, "reference_log_z": 1.5, "tv_target": 0.9}]
    for step in (10, 20, 30, 40, 30, 40):
        rows.append({"kind": "train", "step": step, "loss": 100.0 / step, "log_z": step / 40})
        if step == 20:
            rows.append({"kind": "eval", "step": 20, "elbo_gap": 1.0, "eubo_gap": 0.5,
                         "log_z": 0.5, "iw_log_z": 1.4, "reference_log_z": 1.5,
                         "tv_target": 0.5})
    rows[-2]["loss"], rows[-1]["loss"] = 7.0, 8.0  # the resumed run's rows win
    rows.append({"kind": "eval", "step": 40, "elbo_gap": 0.1, "eubo_gap": float("nan"),
                 "log_z": 1.45, "iw_log_z": 1.5, "reference_log_z": 1.5, "tv_target": 0.1})
    return rows


def lines_of(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in ax.get_lines()}


def test_curves_take_the_newest_row_of_a_step_and_skip_non_finite_values():
    rows = rows_of_a_resumed_run()
    assert curve(rows, "train", "loss") == ([10, 20, 30, 40], [10.0, 5.0, 7.0, 8.0])
    assert curve(rows, "eval", "eubo_gap") == ([0, 20], [2.0, 0.5])  # NaN at 40: left out
    assert curve(rows, "eval", "missing") == ([], [])


def test_the_figure_shows_the_picture_and_the_four_curves(tmp_path):
    picture = tmp_path / "step_40.png"
    plt.imsave(picture, [[0.0, 1.0], [1.0, 0.0]])
    fig = summary_figure(rows_of_a_resumed_run(), picture, "tv_target", "gmm25 · run")
    try:
        image, loss, log_z, gaps, headline = fig.axes
        assert len(image.get_images()) == 1
        assert lines_of(loss)["_child0"] == ([10, 20, 30, 40], [10.0, 5.0, 7.0, 8.0])
        got = lines_of(log_z)
        assert got["learned"] == ([10, 20, 30, 40], [0.25, 0.5, 0.75, 1.0])
        assert got["importance-weighted (eval)"] == ([0, 20, 40], [1.0, 1.4, 1.5])
        assert got["reference"][1] == [1.5, 1.5]
        assert lines_of(gaps)["ELBO gap"] == ([0, 20, 40], [5.0, 1.0, 0.1])
        assert headline.get_title() == "tv_target (eval)"
        assert lines_of(headline)["_child0"] == ([0, 20, 40], [0.9, 0.5, 0.1])
    finally:
        plt.close(fig)


def test_without_a_headline_the_mean_log_reward_is_drawn(tmp_path):
    rows = [{"kind": "eval", "step": 0, "mean_log_reward": -3.0}]
    fig = summary_figure(rows, None, None, "a task without progress metrics")
    try:
        assert fig.axes[-1].get_title() == "mean_log_reward (eval)"
        assert fig.axes[0].texts[0].get_text() == "no evaluation yet"
    finally:
        plt.close(fig)


def test_write_summary_draws_the_newest_evaluation_atomically(tmp_path):
    assert write_summary(tmp_path, "tv_target", "nothing logged") is None
    assert not (tmp_path / "summary.png").exists()
    (tmp_path / "eval").mkdir()
    for step in (0, 20, 40):
        plt.imsave(tmp_path / "eval" / f"step_{step}.png", [[step / 40.0]])
    text = "".join(json.dumps(r) + "\n" for r in rows_of_a_resumed_run())
    (tmp_path / "metrics.jsonl").write_text(text + '{"kind": "train", "st')  # torn by a crash
    assert len(read_rows(tmp_path / "metrics.jsonl")) == len(rows_of_a_resumed_run())
    assert newest_picture(tmp_path, rows_of_a_resumed_run()) == tmp_path / "eval/step_40.png"
    path = write_summary(tmp_path, "tv_target", "gmm25 · run")
    assert path == tmp_path / "summary.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["eval", "metrics.jsonl",
                                                                 "summary.png"]
    width, height = plt.imread(path).shape[1::-1]
    assert (width, height) == (1500, 600)
