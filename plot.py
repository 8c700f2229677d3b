"""A training run's curves as a picture: `curves.png` beside its `log.jsonl`,
one small panel per logged figure (the losses, lambda, the held-out figures),
redrawn beside every checkpoint (common.Run.draw_curves), so a run in
progress can be looked at. Drawn with Pillow, which imageio already brings.

    python plot.py runs/slow_generator_tiny     # redraw a run's curves.png by hand
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


def panel(name, steps, values, font, references=()):
    """One curve: the raw values in grey, their trend in blue, the y range and
    the last value written; references, (name, value), as red level lines."""
    width, height = PANEL
    image = Image.new("RGB", PANEL, "white")
    draw = ImageDraw.Draw(image)
    low, high = min(values + [v for _, v in references]), max(values + [v for _, v in references])
    span = (high - low) or 1.0
    first, last = steps[0], max(steps[-1], steps[0] + 1)
    x = lambda s: MARGIN + (s - first) / (last - first) * (width - MARGIN - 6)
    y = lambda v: height - MARGIN + 14 - (v - low) / span * (height - MARGIN - 6)
    draw.rectangle([MARGIN, 18, width - 6, height - MARGIN + 14], outline=(200, 200, 200))
    for series, colour in ((values, (190, 190, 190)), (smooth(values), (30, 90, 200))):
        points = [(x(s), y(v)) for s, v in zip(steps, series)]
        draw.line(points, fill=colour, width=1) if len(points) > 1 else draw.point(points, fill=colour)
    for label, value in references:
        draw.line([(MARGIN, y(value)), (width - 6, y(value))], fill=(210, 40, 40), width=1)
        above = y(value) - 12 if y(value) > 32 else y(value) + 1  # the label clear of the title
        draw.text((width - 6 - font.getlength(label), above), label, fill=(210, 40, 40), font=font)
    draw.text((MARGIN, 3), f"{name}: {values[-1]:.4g}", fill=(20, 20, 20), font=font)
    draw.text((2, 16), f"{high:.3g}", fill=(90, 90, 90), font=font)
    draw.text((2, height - MARGIN + 6), f"{low:.3g}", fill=(90, 90, 90), font=font)
    draw.text((MARGIN, height - MARGIN + 17), f"step {steps[0]}", fill=(90, 90, 90), font=font)
    draw.text((width - 60, height - MARGIN + 17), f"{steps[-1]}", fill=(90, 90, 90), font=font)
    return np.asarray(image)


def write_curves(log_path, png_path, columns=3):
    """Draw every curve of log.jsonl that changes into png_path, `columns` panels a row (atomically).
    A held-out figure that never changes is a baseline measured once (the naive pairing, the generator
    alone): it is drawn as a level line in the panel of the figure of the same name ("...miou")."""
    every = read_curves(log_path)
    curves = {name: curve for name, curve in every.items() if len(set(curve[1])) > 1}
    if not curves:
        return
    baselines = [(name, curve[1][0]) for name, curve in every.items() if name not in curves]

    def references(name):
        return [(other.split(".")[-2], value) for other, value in baselines
                if name.startswith("held_out.") and other.startswith("held_out.")
                and other.split(".")[-1] == name.split(".")[-1] and other.count(".") == name.count(".")]
    font = ImageFont.load_default(11)
    panels = [panel(name, *curves[name], font, references(name)) for name in curves]
    panels += [np.full_like(panels[0], 255)] * (-len(panels) % columns)
    rows = [np.concatenate(panels[i:i + columns], axis=1) for i in range(0, len(panels), columns)]
    temporary = png_path + ".tmp"
    Image.fromarray(np.concatenate(rows, axis=0)).save(temporary, format="PNG")
    os.replace(temporary, png_path)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.exists(os.path.join(sys.argv[1], "log.jsonl")):
        sys.exit("usage: python plot.py RUN_FOLDER   (a folder with a log.jsonl)")
    write_curves(os.path.join(sys.argv[1], "log.jsonl"), os.path.join(sys.argv[1], "curves.png"))
    print(f"wrote {os.path.join(sys.argv[1], 'curves.png')}")
