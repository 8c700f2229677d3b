"""Looking at clips: tensors to frames, target boxes drawn over them,
side-by-side grids, and writing them as a looping GIF or an MP4.

Object slot k has one colour everywhere, ID_COLORS[k]: in the trajectory
maps the adapters read (data.trajectory_maps) and in the boxes drawn here,
so a box and its map are seen to belong together.
"""

import importlib.util
import io
import os

import imageio.v3 as iio
import numpy as np
import torch
from einops import rearrange
from PIL import Image, ImageDraw, ImageFont  # Pillow, imageio's own dependency: the labels' text, the GIF's colours

from common import UserError, check_writable

# The colour that identifies object k in the trajectory maps (on black). They
# are fixed by slot, not by the object's look: the first frame of every map is
# the segmentation mask, which tells the model which object owns which path.
ID_COLORS = np.array([
    [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
], dtype=np.float32) / 255.0

def to_uint8(video):
    """(T, 3, H, W) in [-1, 1] -> (T, H, W, 3) uint8."""
    video = (video.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
    return rearrange(video.round().to(torch.uint8), "t c h w -> t h w c").numpy()


def maps_to_uint8(maps):
    """(T, 3, H, W) trajectory maps in [0, 1] -> (T, H, W, 3) uint8."""
    return to_uint8(maps * 2 - 1)


def upscale(frames, factor):
    return frames.repeat(factor, axis=1).repeat(factor, axis=2)


def draw_boxes(frames, boxes, factor=1):
    """Outline boxes (K, T, 4) in their ID colours on (T, H, W, 3) uint8 frames,
    after an optional nearest upscale (thin lines stay readable)."""
    frames = upscale(frames, factor).copy()
    H, W = frames.shape[1:3]
    for k in range(len(boxes)):
        color = (ID_COLORS[k] * 255).astype(np.uint8)
        for t in range(frames.shape[0]):
            x0, y0, x1, y1 = (np.asarray(boxes[k, t], dtype=np.float64) * factor).round().astype(int)
            if x1 <= x0 or y1 <= y0:
                continue
            x1, y1 = min(x1, W) - 1, min(y1, H) - 1
            frames[t, y0, x0:x1 + 1] = frames[t, y1, x0:x1 + 1] = color
            frames[t, y0:y1 + 1, x0] = frames[t, y0:y1 + 1, x1] = color
    return frames


def video_grid(rows, gap=2, labels=None):
    """Tile a list of rows, each a list of (T, H, W, 3) uint8 clips, into one
    clip; `labels` name the columns in a band above them."""
    def hcat(clips):
        pad = np.full((clips[0].shape[0], clips[0].shape[1], gap, 3), 255, np.uint8)
        return np.concatenate(sum(([c, pad] for c in clips), [])[:-1], axis=2)
    lines = [hcat(r) for r in rows]
    if labels:
        band = label_band(labels, [clip.shape[2] for clip in rows[0]], gap)
        lines.insert(0, np.broadcast_to(band, (lines[0].shape[0], *band.shape)))
    pad = np.full((lines[0].shape[0], gap, lines[0].shape[2], 3), 255, np.uint8)
    return np.concatenate(sum(([line, pad] for line in lines), [])[:-1], axis=1)


def label_band(labels, widths, gap=2):
    """A white (H, W, 3) band, each label centred over its column; the text is
    as large as the narrowest column lets the longest label be (7 to 11 px)."""
    longest = max(labels, key=len)
    size = next((s for s in range(11, 6, -1) if ImageFont.load_default(s).getlength(longest) <= min(widths)), 7)
    font = ImageFont.load_default(size)
    band = Image.new("RGB", (sum(widths) + gap * (len(widths) - 1), size + 3), "white")
    draw, x = ImageDraw.Draw(band), 0
    for label, width in zip(labels, widths):
        draw.text((x + max(0, (width - font.getlength(label)) / 2), 1), label, fill=(40, 40, 40), font=font)
        x += width + gap
    return np.asarray(band)


VIDEO_FORMATS = (".gif", ".mp4")


def check_video_path(path):
    """Refuse, before any work is done, an output the video cannot be written
    to: a format other than GIF/MP4, MP4 without imageio's ffmpeg plugin, or
    a folder that cannot be made or written."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in VIDEO_FORMATS:
        raise UserError(f"{path}: the video must be a .gif or an .mp4 file")
    if extension == ".mp4" and importlib.util.find_spec("imageio_ffmpeg") is None:
        raise UserError(f"{path}: writing MP4 needs imageio's ffmpeg plugin (pip install imageio-ffmpeg); "
                        f"or write a .gif")
    check_writable(path)


def gif_bytes(frames, fps=8):
    """(T, H, W, 3) uint8 frames as the bytes of a looping GIF (what save_video writes). Each
    frame's 256 colours come from Pillow's fast octree: on sample.py's clip 4 times faster than
    the median cut imageio asks for, half the bytes, and no pixel more than 14 levels off (the
    median cut: up to 113 on rare colours)."""
    images = [Image.fromarray(frame).quantize(256, method=Image.Quantize.FASTOCTREE) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=1000 / fps, loop=0)
    return buffer.getvalue()


def save_video(path, frames, fps=8):
    """Write (T, H, W, 3) uint8 frames as a looping GIF, or as an MP4."""
    check_video_path(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.lower().endswith(".gif"):
        with open(path, "wb") as f:
            f.write(gif_bytes(frames, fps))
    else:  # H.264 players want sides in multiples of 16: pad with white, as between the grid's tiles
        T, H, W = frames.shape[:3]
        padded = np.full((T, -(-H // 16) * 16, -(-W // 16) * 16, 3), 255, np.uint8)
        padded[:, :H, :W] = frames
        iio.imwrite(path, padded, plugin="FFMPEG", fps=fps)


def comparison_video(scenes, clips, indices, labels, factor=4):
    """Rows, one per scene index, of the true clip then each of `clips`
    (B, T, 3, H, W), the scene's target boxes drawn over all, the columns
    named "truth", *labels: one uint8 clip."""
    rows = []
    for i in indices:
        boxes = scenes["boxes"][i, :int(scenes["n_objects"][i])].numpy()
        rows.append([draw_boxes(to_uint8(clip[i]), boxes, factor) for clip in [scenes["video"], *clips]])
    return video_grid(rows, labels=["truth", *labels])
