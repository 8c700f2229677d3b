"""A training run's curves as a picture: `curves.png` beside its `log.jsonl`,
one small panel per logged figure (the losses, lambda, the held-out figures),
redrawn beside every checkpoint (common.Run.draw_curves), so a run in
progress can be looked at. Drawn with Pillow, which imageio already brings.

    python plot.py runs/slow_generator_tiny     # redraw a run's curves.png by hand
    python plot.py runs/lab_fast_adapter runs/lab_adversarial   # two runs on shared axes: curves_compare.png
"""

import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Logged, but not curves: the step itself, which of the 4 steps was trained, throughput.
NOT_CURVES = {"step", "k", "k_adv", "samples_per_s", "time"}
PANEL = (260, 150)  # width, height in pixels
MARGIN = 40  # left and bottom, for the axis labels


def read_curves(log_path):
    """{name: (steps, values)} of every numeric figure in log.jsonl; nested
    records ("held_out": {"naive": ...}) become "held_out.naive"."""
    curves = {}

    def add(step, prefix, record):
        for key, value in record.items():
            name = f"{prefix}{key}"
            if isinstance(value, dict):
                add(step, name + ".", value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool) and name not in NOT_CURVES:
                curves.setdefault(name, ([], []))
                curves[name][0].append(step)
                curves[name][1].append(float(value))
    with open(log_path) as f:
        for line in f:
            record = json.loads(line)
            add(record["step"], "", record)
    return curves


def smooth(values, span=0.05):
    """Exponential moving average over about `span` of the points: the trend of a noisy loss."""
    alpha = 1 / max(1.0, span * len(values))
    out, mean = [], values[0]
    for value in values:
        mean += alpha * (value - mean)
        out.append(mean)
    return out


# Schedules, not noisy measurements: drawn as they are, never smoothed; lambda (10 -> 0.24) on a log scale.
SCHEDULES = {"lambda", "lr"}
LOG_SCALE = {"lambda"}
RUN_COLOURS = [(30, 90, 200), (230, 120, 20), (40, 160, 60), (150, 60, 190), (200, 40, 120), (20, 160, 170)]


def panel(name, runs, font, references=()):
    """One figure: per run (steps, values, colour), the raw values in a light
    tint and their trend in the colour (schedules: as they are); the y range
    and, for one run, its last value written; references, (name, value), as
    red level lines. Every run shares the panel's axes."""
    width, height = PANEL
    image = Image.new("RGB", PANEL, "white")
    draw = ImageDraw.Draw(image)
    log = name.split(".")[-1] in LOG_SCALE and all(v > 0 for _, values, _ in runs for v in values)
    scale = (lambda v: np.log10(v)) if log else (lambda v: v)
    every = [v for _, values, _ in runs for v in values] + [v for _, v in references]
    low, high = min(every), max(every)
    span = (scale(high) - scale(low)) or 1.0
    first = min(steps[0] for steps, _, _ in runs)
    last = max(max(steps[-1] for steps, _, _ in runs), first + 1)
    x = lambda s: MARGIN + (s - first) / (last - first) * (width - MARGIN - 6)
    y = lambda v: height - MARGIN + 14 - (scale(v) - scale(low)) / span * (height - MARGIN - 6)
    draw.rectangle([MARGIN, 18, width - 6, height - MARGIN + 14], outline=(200, 200, 200))
    for steps, values, colour in runs:
        tint = tuple(int(255 - 0.35 * (255 - c)) for c in colour)
        series = [(values, colour)] if name.split(".")[-1] in SCHEDULES else [(values, tint), (smooth(values), colour)]
        for points, fill in series:
            points = [(x(s), y(v)) for s, v in zip(steps, points)]
            draw.line(points, fill=fill, width=1) if len(points) > 1 else draw.point(points, fill=fill)
    for label, value in references:
        draw.line([(MARGIN, y(value)), (width - 6, y(value))], fill=(210, 40, 40), width=1)
        above = y(value) - 12 if y(value) > 32 else y(value) + 1  # the label clear of the title
        draw.text((width - 6 - font.getlength(label), above), label, fill=(210, 40, 40), font=font)
    title = f"{name}: {runs[0][1][-1]:.4g}" if len(runs) == 1 else name
    draw.text((MARGIN, 3), title + (" (log)" if log else ""), fill=(20, 20, 20), font=font)
    draw.text((2, 16), f"{high:.3g}", fill=(90, 90, 90), font=font)
    draw.text((2, height - MARGIN + 6), f"{low:.3g}", fill=(90, 90, 90), font=font)
    draw.text((MARGIN, height - MARGIN + 17), f"step {first}", fill=(90, 90, 90), font=font)
    draw.text((width - 60, height - MARGIN + 17), f"{last}", fill=(90, 90, 90), font=font)
    return np.asarray(image)


def baselines_of(every, changing):
    """A held-out figure that never changes is a baseline measured once (the naive pairing, the
    generator alone): {figure name: [(its label, value)]}, to be drawn in the panel of the figure of
    the same name ("...miou")."""
    lines = {}
    for other, (_, values) in every.items():
        if other in changing or not other.startswith("held_out."):
            continue
        for name in changing:
            if name.startswith("held_out.") and other.split(".")[-1] == name.split(".")[-1] \
                    and other.count(".") == name.count("."):
                lines.setdefault(name, []).append((other.split(".")[-2], values[0]))
    return lines


def write_curves(log_paths, png_path, columns=3, labels=None):
    """Draw every curve that changes, of one log.jsonl or of several runs on shared axes
    (a legend of `labels` on top), into png_path, `columns` panels a row (atomically)."""
    log_paths = [log_paths] if isinstance(log_paths, (str, os.PathLike)) else list(log_paths)
    logs = [read_curves(path) for path in log_paths]
    names = [name for name in dict.fromkeys(n for curves in logs for n in curves)
             if any(len(set(curves[name][1])) > 1 for curves in logs if name in curves)]
    if not names:
        return
    references = baselines_of(logs[0], set(names)) if len(logs) == 1 else {}
    font = ImageFont.load_default(11)
    panels = [panel(name, [(*curves[name], RUN_COLOURS[i % len(RUN_COLOURS)]) for i, curves in enumerate(logs)
                           if name in curves], font, references.get(name, ())) for name in names]
    panels += [np.full_like(panels[0], 255)] * (-len(panels) % columns)
    rows = [np.concatenate(panels[i:i + columns], axis=1) for i in range(0, len(panels), columns)]
    if len(logs) > 1:
        rows.insert(0, legend(labels or [str(p) for p in log_paths], rows[0].shape[1], font))
    temporary = png_path + ".tmp"
    Image.fromarray(np.concatenate(rows, axis=0)).save(temporary, format="PNG")
    os.replace(temporary, png_path)


def legend(labels, width, font):
    """A band naming each run in its colour."""
    image = Image.new("RGB", (width, 18 * len(labels) + 4), "white")
    draw = ImageDraw.Draw(image)
    for i, label in enumerate(labels):
        colour = RUN_COLOURS[i % len(RUN_COLOURS)]
        draw.line([(8, 11 + 18 * i), (30, 11 + 18 * i)], fill=colour, width=3)
        draw.text((36, 4 + 18 * i), label, fill=(20, 20, 20), font=font)
    return np.asarray(image)


USAGE = """usage: python plot.py RUN [RUN ...] [--out=FILE.png]
  one run: redraws RUN/curves.png; several: draws them on shared axes into
  --out (default: curves_compare.png here). A RUN is a folder with a log.jsonl."""


if __name__ == "__main__":
    runs = [arg for arg in sys.argv[1:] if not arg.startswith("--out=")]
    outs = [arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith("--out=")]
    if not runs or len(outs) > 1 or any(not os.path.exists(os.path.join(run, "log.jsonl")) for run in runs):
        sys.exit(USAGE)
    out = outs[0] if outs else os.path.join(runs[0], "curves.png") if len(runs) == 1 else "curves_compare.png"
    write_curves([os.path.join(run, "log.jsonl") for run in runs], out, labels=runs)
    print(f"wrote {out}")
