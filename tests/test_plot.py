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
