import json

import imageio.v3 as iio
import numpy as np

import plot
from video import label_band, video_grid


def write_log(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_curves_are_read_flat_and_only_changing_figures_are_drawn(tmp_path):
    records = [{"step": s, "k": s % 4, "loss": 1 / s, "lambda": 1.0, "held_out": {"naive": 0.5, "finetuned": 0.5 + s},
                "samples_per_s": 3.0, "time": 100.0 + s} for s in range(1, 7)]
    write_log(tmp_path / "log.jsonl", records)
    curves = plot.read_curves(tmp_path / "log.jsonl")
    assert set(curves) == {"loss", "lambda", "held_out.naive", "held_out.finetuned"}
    assert curves["held_out.finetuned"] == ([1, 2, 3, 4, 5, 6], [1.5, 2.5, 3.5, 4.5, 5.5, 6.5])
    plot.write_curves(str(tmp_path / "log.jsonl"), str(tmp_path / "curves.png"), columns=3)
    image = iio.imread(tmp_path / "curves.png")
    assert image.shape[:2] == (plot.PANEL[1], 3 * plot.PANEL[0])  # loss and held_out.finetuned change: one row
    assert not (tmp_path / "curves.png.tmp").exists()


def test_a_baseline_measured_once_is_a_level_line_in_its_figures_panel(tmp_path):
    records = [{"step": s, "held_out": {"naive": {"miou": 0.9}, "finetuned": {"miou": 0.5 + s / 100}}}
               for s in range(1, 5)]
    write_log(tmp_path / "log.jsonl", records)
    plot.write_curves(str(tmp_path / "log.jsonl"), str(tmp_path / "curves.png"), columns=1)
    image = iio.imread(tmp_path / "curves.png").astype(int)
    assert image.shape[:2] == (plot.PANEL[1], plot.PANEL[0])  # one panel: held_out.finetuned.miou
    red = (image[..., 0] > 180) & (image[..., 1] < 90) & (image[..., 2] < 90)
    rows = np.flatnonzero(red[:, plot.MARGIN + 5:plot.MARGIN + 50].all(1))
    assert len(rows) == 1 and rows[0] < 30  # 0.9, above every value of the curve: the top of the plot


def test_the_columns_are_named_in_the_picture():
    clips = [np.zeros((2, 16, 64, 3), np.uint8), np.zeros((2, 16, 40, 3), np.uint8)]
    band = label_band(["truth", "adversarial-only"], [64, 40])
    assert band.shape[1] == 64 + 2 + 40 and (band < 128).any()  # text drawn, fitted to the narrow column
    grid = video_grid([clips, clips], labels=["truth", "adversarial-only"])
    plain = video_grid([clips, clips])
    assert grid.shape[0] == 2 and grid.shape[1] == plain.shape[1] + band.shape[0] + 2
    assert np.array_equal(grid[:, -plain.shape[1]:], plain)


def test_two_runs_share_the_axes_and_lambda_is_drawn_as_it_is_on_a_log_scale(tmp_path):
    for name, rate in (("a", 4.0), ("b", 40.0)):
        (tmp_path / name).mkdir()
        write_log(tmp_path / name / "log.jsonl", [{"step": s, "loss": 1 / s + 0.1 * (s % 2),
                                                   "lambda": 1 / (rate * s / 10 + 0.1)} for s in range(1, 11)])
    out = tmp_path / "compare.png"
    plot.write_curves([tmp_path / "a" / "log.jsonl", tmp_path / "b" / "log.jsonl"], str(out), columns=2,
                      labels=["a", "b"])
    image = iio.imread(out).astype(int)
    band = 18 * 2 + 4  # the legend: one line a run
    assert image.shape[:2] == (band + plot.PANEL[1], 2 * plot.PANEL[0])  # loss and lambda: one row
    lam = image[band:, plot.PANEL[0]:]  # the lambda panel, second
    has = lambda colour: (np.abs(lam - np.array(colour)).sum(-1) < 30).any()
    assert has(plot.RUN_COLOURS[0]) and has(plot.RUN_COLOURS[1])  # both runs, in their colours
    tint = tuple(int(255 - 0.35 * (255 - c)) for c in plot.RUN_COLOURS[0])
    assert not has(tint)  # a schedule: drawn as it is, no smoothed trend over a tinted raw line
    # Log scale: lambda = 1 (halfway between 10 and 0.1 in log) is drawn halfway up the panel.
    panel = plot.panel("lambda", [([0, 1, 2], [10.0, 1.0, 0.1], (0, 0, 0))], plot.ImageFont.load_default(11))
    width, height = plot.PANEL
    x, y = plot.MARGIN + (width - plot.MARGIN - 6) / 2, height - plot.MARGIN + 14 - (height - plot.MARGIN - 6) / 2
    assert (panel[int(y) - 2:int(y) + 3, int(x) - 2:int(x) + 3].sum(-1) < 100).any()


def test_plot_py_draws_several_runs_into_one_picture(tmp_path):
    import subprocess
    import sys
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_log(tmp_path / name / "log.jsonl", [{"step": s, "loss": 1 / s} for s in range(1, 5)])
    result = subprocess.run([sys.executable, "plot.py", str(tmp_path / "a"), str(tmp_path / "b"),
                             f"--out={tmp_path / 'both.png'}"], capture_output=True, text=True)
    assert result.returncode == 0 and f"wrote {tmp_path / 'both.png'}" in result.stdout
    assert iio.imread(tmp_path / "both.png").shape[0] == 18 * 2 + 4 + plot.PANEL[1]
    missing = subprocess.run([sys.executable, "plot.py", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert missing.returncode == 1 and "usage: python plot.py RUN [RUN ...]" in missing.stderr
