"""The sprite world: procedural videos of coloured shapes moving over quiet
backgrounds, with the exact mask and box of every object in every frame, the
trajectory conditions of the MagicMotion/FlashMotion family (mask maps and box
maps), scene files (JSON) and folders of the user's own clips.

Conventions. Pixel coordinates, origin top-left, x to the right; pixel (row i,
column j) has its centre at (j + 0.5, i + 0.5). A box is [x0, y0, x1, y1] with
the object covering columns x0 <= x < x1 and rows y0 <= y < y1. Objects are
listed back to front: a later object occludes an earlier one.

`python data.py` writes a preview GIF of random scenes with their boxes drawn.
"""

import json
import os
import sys
from dataclasses import dataclass, field

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import IterableDataset, get_worker_info

from common import UserError, apply_overrides

# Video sizes by config name (frames, pixels). `micro` exists for the tests.
CONFIGS = {
    "micro": dict(frames=4, size=16),
    "tiny": dict(frames=16, size=32),   # CPU default, shipped checkpoints
    "small": dict(frames=16, size=64),  # one GPU
}

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
BACKGROUNDS = ("solid", "gradient", "noise", "stripes")
TRAJECTORIES = ("straight", "curved", "bounce", "stop_and_go")
MAX_OBJECTS = 6
HELD_OUT_SEED = 1_000_003  # scenes for samples and evaluation; training uses seeds 0, 1, ...

# Saturated, mutually distinct object colours. Backgrounds are kept desaturated
# (see random_background_colors), so a simple colour match segments objects.
OBJECT_COLORS = np.array([
    [230, 40, 40], [40, 200, 60], [50, 90, 240], [240, 210, 30],
    [220, 50, 220], [30, 210, 220], [250, 130, 20], [150, 70, 240],
], dtype=np.uint8)

# The colour that identifies object k in the trajectory maps (on black). They
# are fixed by slot, not by the object's look: the first frame of every map is
# the segmentation mask, which tells the model which object owns which path.
ID_COLORS = np.array([
    [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
], dtype=np.float32) / 255.0


# ------------------------------------------------------------------ scenes --

@dataclass
class SceneObject:
    shape: str
    color: tuple          # (r, g, b) in 0..255
    size: float           # extent in pixels (diameter of the circle)
    centers: np.ndarray   # (T, 2) float, x and y of the centre per frame


@dataclass
class Scene:
    size: int
    frames: int
    background: dict = field(default_factory=lambda: {"kind": "solid", "seed": 0})
    objects: list = field(default_factory=list)
    first_frame: np.ndarray = None   # (H, W, 3) float in [0, 1], user-given scenes only
    user_boxes: np.ndarray = None    # (K, T, 4), user-given scenes only


def shape_mask(shape, size, centers, image_size):
    """Exact binary masks of one object for every frame: (T, H, W) bool."""
    coords = np.arange(image_size) + 0.5
    dx = coords[None, None, :] - centers[:, 0, None, None]   # (T, 1, W)
    dy = coords[None, :, None] - centers[:, 1, None, None]   # (T, H, 1)
    r = size / 2
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape == "triangle":  # apex up, base at the bottom
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape == "cross":
        arm = r / 3
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= r)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= r))
    raise ValueError(f"unknown shape {shape}")


def mask_to_box(masks):
    """(T, H, W) bool -> (T, 4) boxes [x0, y0, x1, y1]; an empty mask gives zeros."""
    boxes = np.zeros((masks.shape[0], 4), dtype=np.float32)
    for t, m in enumerate(masks):
        rows, cols = np.nonzero(m)
        if len(rows):
            boxes[t] = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
    return boxes


def render_background(spec, size):
    """(H, W, 3) float in [0, 1], static over time, fully determined by the spec."""
    rng = np.random.default_rng(spec.get("seed", 0))
    base, other = random_background_colors(rng)
    if "color" in spec:
        base = np.asarray(spec["color"], dtype=np.float32) / 255
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    kind = spec["kind"]
    if kind == "solid":
        return np.broadcast_to(base, (size, size, 3)).copy()
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(angle) * (xx - 0.5) + np.sin(angle) * (yy - 0.5)) / np.sqrt(0.5) * 0.5 + 0.5
        return base + (other - base) * ramp[..., None]
    if kind == "noise":  # smooth low-contrast blobs: a coarse random grid, upsampled
        coarse = torch.from_numpy(rng.normal(0, 1, (1, 1, 5, 5)).astype(np.float32))
        smooth = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)[0, 0].numpy()
        return np.clip(base + 0.06 * smooth[..., None], 0, 1)
    if kind == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.15, 0.35)
        phase = (np.cos(angle) * xx + np.sin(angle) * yy) / period
        stripes = np.sign(np.sin(2 * np.pi * phase))[..., None]
        return np.clip(base + 0.05 * stripes, 0, 1)
    raise ValueError(f"unknown background {kind}")


def random_background_colors(rng):
    """Two desaturated colours (saturation <= 0.25), far from the object palette."""
    def one():
        grey = rng.uniform(0.25, 0.7)
        tint = rng.uniform(-1, 1, 3)
        return np.clip(grey + 0.08 * tint, 0, 1).astype(np.float32)
    return one(), one()


# ------------------------------------------------------------ trajectories --

def random_trajectory(rng, kind, frames, low, high):
    """Per-frame centres (T, 2) staying inside [low, high] on both axes."""
    span = high - low
    point = lambda: rng.uniform(low, high, 2)
    if kind == "straight":
        start = point()
        end = point()
        while np.linalg.norm(end - start) < 0.3 * span:
            end = point()
        s = np.linspace(0, 1, frames)[:, None]
        return start + s * (end - start)
    if kind == "curved":
        keys = np.stack([point() for _ in range(rng.integers(3, 5))])
        return np.clip(catmull_rom(keys, frames), low, high)
    if kind == "bounce":
        pos, speed = point(), rng.uniform(0.04, 0.12) * span * 16 / frames
        angle = rng.uniform(0, 2 * np.pi)
        vel = speed * np.array([np.cos(angle), np.sin(angle)])
        out = np.zeros((frames, 2))
        for t in range(frames):
            out[t] = pos
            pos = pos + vel
            for axis in range(2):  # reflect off the walls
                if pos[axis] < low or pos[axis] > high:
                    pos[axis] = 2 * (low if pos[axis] < low else high) - pos[axis]
                    vel[axis] = -vel[axis]
        return out
    if kind == "stop_and_go":  # a straight or curved path, with pauses in time
        path = random_trajectory(rng, rng.choice(["straight", "curved"]), frames, low, high)
        moving = rng.random(frames - 1) < 0.55
        moving[rng.integers(frames - 1)] = True
        progress = np.concatenate([[0], np.cumsum(moving)]) / moving.sum()
        return resample_polyline(path, progress)
    raise ValueError(f"unknown trajectory {kind}")


def catmull_rom(keys, frames):
    """A smooth curve through the key points, sampled at `frames` instants."""
    padded = np.concatenate([keys[:1], keys, keys[-1:]])
    segments = len(keys) - 1
    out = []
    for s in np.linspace(0, segments, frames):
        i = min(int(s), segments - 1)
        u = s - i
        p0, p1, p2, p3 = padded[i:i + 4]
        out.append(0.5 * (2 * p1 + (p2 - p0) * u + (2 * p0 - 5 * p1 + 4 * p2 - p3) * u ** 2
                          + (3 * p1 - p0 - 3 * p2 + p3) * u ** 3))
    return np.array(out)


def resample_polyline(points, progress):
    """Positions at fractions `progress` (0..1) of the arc length of a polyline."""
    seg = np.linalg.norm(np.diff(points, axis=0), axis=1)
    arc = np.concatenate([[0], np.cumsum(seg)])
    if arc[-1] == 0:
        return np.repeat(points[:1], len(progress), axis=0)
    target = np.asarray(progress) * arc[-1]
    return np.stack([np.interp(target, arc, points[:, d]) for d in range(2)], axis=1)


def random_scene(rng, frames, size, n_objects=None):
    """A fresh random scene: 1-6 objects of distinct colours and random paths."""
    n = int(n_objects or rng.integers(1, MAX_OBJECTS + 1))
    colors = rng.choice(len(OBJECT_COLORS), n, replace=False)
    scale = size / 32
    objects = []
    for k in range(n):
        obj_size = rng.uniform(4, 10) * scale
        margin = obj_size / 2
        centers = random_trajectory(rng, rng.choice(TRAJECTORIES), frames, margin, size - margin)
        objects.append(SceneObject(str(rng.choice(SHAPES)), tuple(int(c) for c in OBJECT_COLORS[colors[k]]),
                                   float(obj_size), centers))
    background = {"kind": str(rng.choice(BACKGROUNDS)), "seed": int(rng.integers(1 << 31))}
    return Scene(size=size, frames=frames, background=background, objects=objects)


# --------------------------------------------------------------- rendering --

@dataclass
class Rendered:
    video: np.ndarray    # (T, H, W, 3) float in [0, 1]; for user scenes only frame 0 is real
    masks: np.ndarray    # (K, T, H, W) bool, visible part of each object (after occlusion)
    boxes: np.ndarray    # (K, T, 4) float, box of the whole object (amodal)
    colors: np.ndarray   # (K, 3) uint8, the objects' own colours
    has_video: bool = True


def render(scene):
    """Draw a scene back to front; return the video with exact masks and boxes."""
    T, S = scene.frames, scene.size
    if scene.first_frame is not None:
        return render_user_scene(scene)
    video = np.repeat(render_background(scene.background, S)[None], T, axis=0)
    full = np.stack([shape_mask(o.shape, o.size, o.centers, S) for o in scene.objects])  # (K, T, H, W)
    visible = full.copy()
    for k, obj in enumerate(scene.objects):
        video[full[k]] = np.asarray(obj.color, dtype=np.float32) / 255
        visible[:k] &= ~full[k]  # what is painted later hides what lies behind
    boxes = np.stack([mask_to_box(m) for m in full])
    colors = np.array([o.color for o in scene.objects], dtype=np.uint8)
    return Rendered(video.astype(np.float32), visible, boxes, colors)


def render_user_scene(scene):
    """A user's own first frame with per-frame boxes: no true video, and the
    masks are the filled boxes (the only shape information given)."""
    K, T = scene.user_boxes.shape[:2]
    masks = np.zeros((K, T, scene.size, scene.size), dtype=bool)
    for k in range(K):
        for t in range(T):
            x0, y0, x1, y1 = np.round(scene.user_boxes[k, t]).astype(int)
            masks[k, t, y0:y1, x0:x1] = True
    for k in range(K):
        masks[:k] &= ~masks[k]
    video = np.repeat(scene.first_frame[None], T, axis=0).astype(np.float32)
    return Rendered(video, masks, scene.user_boxes.astype(np.float32),
                    np.zeros((K, 3), dtype=np.uint8), has_video=False)


def trajectory_maps(masks, boxes, size):
    """The adapter's conditions, each (T, 3, H, W) float in [0, 1] on black:
    mask maps (visible masks in ID colours) and box maps (filled boxes in ID
    colours, back to front), whose first frame is the segmentation mask."""
    K, T = masks.shape[:2]
    mask_maps = np.zeros((T, size, size, 3), dtype=np.float32)
    box_maps = np.zeros((T, size, size, 3), dtype=np.float32)
    for k in range(K):
        mask_maps[masks[k]] = ID_COLORS[k]
        for t in range(1, T):
            x0, y0, x1, y1 = np.round(boxes[k, t]).astype(int)
            box_maps[t, y0:y1, x0:x1] = ID_COLORS[k]
    box_maps[0] = mask_maps[0]
    to_tensor = lambda a: torch.from_numpy(rearrange(a, "t h w c -> t c h w").copy())
    return to_tensor(mask_maps), to_tensor(box_maps)


def to_sample(rendered, size):
    """Tensors for the models, objects padded to MAX_OBJECTS slots:
    video (T, 3, H, W) in [-1, 1], mask_maps/box_maps (T, 3, H, W) in [0, 1],
    masks (MAX_OBJECTS, T, H, W) bool, boxes (MAX_OBJECTS, T, 4), colors
    (MAX_OBJECTS, 3), n_objects ()."""
    K, T = rendered.masks.shape[:2]
    mask_maps, box_maps = trajectory_maps(rendered.masks, rendered.boxes, size)
    masks = np.zeros((MAX_OBJECTS, T, size, size), dtype=bool)
    boxes = np.zeros((MAX_OBJECTS, T, 4), dtype=np.float32)
    colors = np.zeros((MAX_OBJECTS, 3), dtype=np.uint8)
    masks[:K], boxes[:K], colors[:K] = rendered.masks, rendered.boxes, rendered.colors
    video = rearrange(rendered.video, "t h w c -> t c h w") * 2 - 1
    return {
        "video": torch.from_numpy(np.ascontiguousarray(video)),
        "mask_maps": mask_maps, "box_maps": box_maps,
        "masks": torch.from_numpy(masks), "boxes": torch.from_numpy(boxes),
        "colors": torch.from_numpy(colors), "n_objects": torch.tensor(K),
    }


def collate(samples):
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


# ---------------------------------------------------------------- datasets --

class BatchStream(IterableDataset):
    """Endless batches. Batch `i` of rank `r` is a pure function of (seed, r, i),
    so every worker and rank sees different data, and a run resumed at batch
    `start` replays exactly the stream an uninterrupted run would have seen."""

    def __init__(self, batch_size, seed=0, rank=0, start=0):
        self.batch_size, self.seed, self.rank, self.start = batch_size, seed, rank, start

    def rng(self, index, j):
        return np.random.default_rng([self.seed, self.rank, index * self.batch_size + j])

    def batch(self, index):
        return collate([self.sample(self.rng(index, j)) for j in range(self.batch_size)])

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        # The DataLoader takes batches from its workers round robin, so worker w
        # making batches start+w, start+w+workers, ... keeps the global order.
        index = self.start + worker
        while True:
            yield self.batch(index)
            index += workers


class SpriteWorld(BatchStream):
    """Fresh random scenes, `n_objects` per scene (random 1..6 when None)."""

    def __init__(self, frames, size, batch_size, seed=0, rank=0, start=0, n_objects=None):
        super().__init__(batch_size, seed, rank, start)
        self.frames, self.size, self.n_objects = frames, size, n_objects

    def sample(self, rng):
        return to_sample(render(random_scene(rng, self.frames, self.size, self.n_objects)), self.size)


class ClipFolder(BatchStream):
    """The user's own clips: every `name.mp4` / `name.gif` in a folder beside a
    `name.json` of per-frame boxes per object, in the clip's pixel coordinates:
    {"objects": [{"boxes": [[x0, y0, x1, y1], ...one per frame]}, ...]}.
    Clips are resized to a square of `size` and `frames` frames are taken
    evenly; masks are the filled boxes (no segmentation is given). Batches
    draw clips at random, with replacement."""

    def __init__(self, folder, frames, size, batch_size, seed=0, rank=0, start=0):
        super().__init__(batch_size, seed, rank, start)
        if not os.path.isdir(folder):
            raise UserError(f"clip folder not found: {folder}")
        self.paths = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                            if f.lower().endswith((".mp4", ".gif")))
        if not self.paths:
            raise UserError(f"{folder}: no .mp4 or .gif clips")
        self.frames, self.size = frames, size
        self.cache = {}

    def sample(self, rng):
        path = self.paths[rng.integers(len(self.paths))]
        if path not in self.cache:
            self.cache[path] = to_sample(load_clip(path, self.frames, self.size), self.size)
        return self.cache[path]


def load_clip(path, frames, size):
    boxes_path = os.path.splitext(path)[0] + ".json"
    if not os.path.exists(boxes_path):
        raise UserError(f"{path}: no boxes file {boxes_path} beside it")
    try:
        clip = np.asarray(iio.imread(path, index=None))  # (T, H, W, C)
    except Exception as e:  # imageio names the missing plugin (e.g. for mp4)
        raise UserError(f"{path}: cannot read video ({e})") from None
    if clip.ndim == 3:
        clip = clip[..., None].repeat(3, -1)
    clip = clip[..., :3].astype(np.float32) / 255
    T0, H0, W0 = clip.shape[:3]
    spec = read_json(boxes_path)
    objects = spec.get("objects") if isinstance(spec, dict) else None
    if not isinstance(objects, list) or not 1 <= len(objects) <= MAX_OBJECTS:
        raise UserError(f"{boxes_path}: 'objects' must be a list of 1 to {MAX_OBJECTS} objects")
    boxes = []
    for k, obj in enumerate(objects):
        b = np.asarray(obj.get("boxes", []) if isinstance(obj, dict) else [], dtype=np.float32)
        if b.shape != (T0, 4):
            raise UserError(f"{boxes_path}: objects[{k}].boxes must hold {T0} boxes [x0, y0, x1, y1], "
                            f"one per frame of the clip")
        boxes.append(b)
    keep = np.linspace(0, T0 - 1, frames).round().astype(int)
    video = torch.from_numpy(rearrange(clip[keep], "t h w c -> t c h w"))
    video = F.interpolate(video, size=(size, size), mode="area" if H0 >= size else "bilinear")
    boxes = np.stack(boxes)[:, keep] * np.array([size / W0, size / H0] * 2, dtype=np.float32)
    boxes = np.clip(boxes, 0, size)
    first_frame = rearrange(video[0].clamp(0, 1).numpy(), "c h w -> h w c")
    rendered = render_user_scene(Scene(size, frames, first_frame=first_frame, user_boxes=boxes))
    rendered.video = rearrange(video.clamp(0, 1).numpy(), "t c h w -> t h w c")
    rendered.has_video = True
    return rendered


# ------------------------------------------------------------- scene files --

def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None


def load_scene(path):
    """Read, validate and interpret a scene file. Every problem is collected and
    reported together, each with the field it concerns; nothing is rendered
    from a scene that is wrong anywhere."""
    return parse_scene(read_json(path), base_dir=os.path.dirname(os.path.abspath(path)), name=path)


def parse_scene(spec, base_dir=".", name="scene"):
    errors = []
    err = errors.append
    if not isinstance(spec, dict):
        raise UserError(f"{name}: a scene must be a JSON object")
    for key in spec:
        if key not in ("size", "frames", "background", "objects", "first_frame"):
            err(f"'{key}': unknown field (known: size, frames, background, objects, first_frame)")
    size, frames = spec.get("size"), spec.get("frames")
    if not is_int(size) or not 8 <= size <= 512:
        err("'size': must be a whole number of pixels from 8 to 512")
        size = None
    if not is_int(frames) or not 2 <= frames <= 256:
        err("'frames': must be a whole number from 2 to 256")
        frames = None

    background = spec.get("background", {"kind": "solid", "seed": 0})
    if not isinstance(background, dict):
        err("'background': must be an object like {\"kind\": \"gradient\", \"seed\": 3}")
    else:
        for key in background:
            if key not in ("kind", "seed", "color"):
                err(f"'background.{key}': unknown field (known: kind, seed, color)")
        if background.get("kind") not in BACKGROUNDS:
            err(f"'background.kind': must be one of {', '.join(BACKGROUNDS)}")
        if not is_int(background.get("seed", 0)):
            err("'background.seed': must be a whole number")
        if "color" in background and not is_color(background["color"]):
            err("'background.color': must be [r, g, b] with each value 0..255")

    first_frame = None
    user_image = "first_frame" in spec
    if user_image:
        image_path = spec["first_frame"]
        if not isinstance(image_path, str):
            err("'first_frame': must be the path of an image file")
        elif size is not None:
            first_frame = read_first_frame(os.path.join(base_dir, image_path), size, err)

    objects = spec.get("objects")
    parsed, user_boxes = [], []
    if not isinstance(objects, list) or not 1 <= len(objects) <= MAX_OBJECTS:
        err(f"'objects': must be a list of 1 to {MAX_OBJECTS} objects")
        objects = []
    for k, obj in enumerate(objects):
        where = f"objects[{k}]"
        if not isinstance(obj, dict):
            err(f"'{where}': must be an object")
            continue
        if user_image:
            user_boxes.append(parse_user_boxes(obj, where, size, frames, err))
        else:
            parsed.append(parse_object(obj, where, size, frames, err))

    if errors:
        raise UserError(f"{name}: " + "; ".join(errors))
    scene = Scene(size=size, frames=frames, background=background, objects=parsed)
    if user_image:
        scene.first_frame, scene.user_boxes = first_frame, np.stack(user_boxes)
    return scene


def parse_object(obj, where, size, frames, err):
    for key in obj:
        if key not in ("shape", "color", "size", "path"):
            err(f"'{where}.{key}': unknown field (known: shape, color, size, path)")
    if obj.get("shape") not in SHAPES:
        err(f"'{where}.shape': must be one of {', '.join(SHAPES)}")
    if not is_color(obj.get("color")):
        err(f"'{where}.color': must be [r, g, b] with each value 0..255")
    obj_size = obj.get("size")
    if not is_number(obj_size) or size is not None and not 2 <= obj_size <= size / 2:
        err(f"'{where}.size': must be a number of pixels from 2 to {size // 2 if size else 'size/2'}")
    path = obj.get("path")
    if not isinstance(path, list) or not path:
        err(f"'{where}.path': must be a non-empty list of [x, y] points")
        return None
    points = []
    for i, p in enumerate(path):
        if not (isinstance(p, list) and len(p) == 2 and all(is_number(v) for v in p)):
            err(f"'{where}.path[{i}]': must be a point [x, y]")
        elif size is not None and not all(0 <= v <= size for v in p):
            err(f"'{where}.path[{i}]': point {p} is outside the {size}x{size} frame")
        else:
            points.append(p)
    if len(points) != len(path) or frames is None:
        return None
    points = np.asarray(points, dtype=np.float64)
    if len(points) != frames:  # key points: constant speed along the polyline
        points = resample_polyline(points, np.linspace(0, 1, frames))
    return SceneObject(obj["shape"], tuple(obj.get("color") or (0, 0, 0)), float(obj_size or 0), points)


def parse_user_boxes(obj, where, size, frames, err):
    for key in obj:
        if key not in ("boxes",):
            err(f"'{where}.{key}': unknown field (with first_frame, an object has only 'boxes')")
    boxes = obj.get("boxes")
    if not isinstance(boxes, list) or frames is not None and len(boxes) != frames:
        err(f"'{where}.boxes': must be a list of {frames} boxes [x0, y0, x1, y1], one per frame")
        return np.zeros((frames or 1, 4))
    for t, b in enumerate(boxes):
        if not (isinstance(b, list) and len(b) == 4 and all(is_number(v) for v in b)):
            err(f"'{where}.boxes[{t}]': must be a box [x0, y0, x1, y1]")
        elif size is not None and not (0 <= b[0] < b[2] <= size and 0 <= b[1] < b[3] <= size):
            err(f"'{where}.boxes[{t}]': box {b} is empty or outside the {size}x{size} frame")
    try:
        return np.asarray(boxes, dtype=np.float32).reshape(len(boxes), 4)
    except (TypeError, ValueError):
        return np.zeros((len(boxes), 4))


def read_first_frame(path, size, err):
    try:
        image = np.asarray(iio.imread(path))
    except Exception as e:
        err(f"'first_frame': cannot read image {path} ({e.__class__.__name__})")
        return None
    if image.ndim == 2:
        image = image[..., None].repeat(3, -1)
    image = torch.from_numpy(image[..., :3].astype(np.float32) / 255)
    image = F.interpolate(rearrange(image, "h w c -> 1 c h w"), size=(size, size), mode="area")
    return rearrange(image[0], "c h w -> h w c").numpy()


def scene_to_json(scene):
    """The inverse of parse_scene for generated scenes (one point per frame)."""
    return {
        "size": scene.size, "frames": scene.frames, "background": scene.background,
        "objects": [{"shape": o.shape, "color": list(o.color), "size": round(o.size, 3),
                     "path": np.round(o.centers, 3).tolist()} for o in scene.objects],
    }


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def is_color(v):
    return isinstance(v, list) and len(v) == 3 and all(is_int(c) and 0 <= c <= 255 for c in v)


# ----------------------------------------------------- looking at videos ----

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


def video_grid(rows, gap=2):
    """Tile a list of rows, each a list of (T, H, W, 3) uint8 clips, into one clip."""
    def hcat(clips):
        pad = np.full((clips[0].shape[0], clips[0].shape[1], gap, 3), 255, np.uint8)
        return np.concatenate(sum(([c, pad] for c in clips), [])[:-1], axis=2)
    lines = [hcat(r) for r in rows]
    pad = np.full((lines[0].shape[0], gap, lines[0].shape[2], 3), 255, np.uint8)
    return np.concatenate(sum(([line, pad] for line in lines), [])[:-1], axis=1)


def save_video(path, frames, fps=8):
    """Write (T, H, W, 3) uint8 frames as a looping GIF (or MP4 where a plugin is)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".gif"):
        iio.imwrite(path, frames, duration=1000 / fps, loop=0)
    else:
        iio.imwrite(path, frames, fps=fps)


def preview_sample(sample, factor=4):
    """One row of a preview: video with target boxes, box maps, mask maps."""
    n = int(sample["n_objects"])
    boxes = sample["boxes"][:n].numpy()
    return [draw_boxes(to_uint8(sample["video"]), boxes, factor),
            upscale(maps_to_uint8(sample["box_maps"]), factor),
            upscale(maps_to_uint8(sample["mask_maps"]), factor)]


if __name__ == "__main__":
    settings = apply_overrides({"config": "tiny", "n": 6, "seed": 0, "out": "previews/data.gif"}, sys.argv[1:])
    if settings["config"] not in CONFIGS:
        raise UserError(f"--config must be one of {', '.join(CONFIGS)}")
    shape = CONFIGS[settings["config"]]
    world = SpriteWorld(**shape, batch_size=settings["n"], seed=settings["seed"])
    batch = world.batch(0)
    rows = [preview_sample({k: v[i] for k, v in batch.items()}) for i in range(settings["n"])]
    save_video(settings["out"], video_grid(rows))
    print(f"wrote {settings['out']}: {settings['n']} scenes (video with boxes | box maps | mask maps)")
