"""The sprite world: procedural videos of coloured shapes moving over quiet
backgrounds, with the exact mask and box of every object in every frame, and
the trajectory conditions of the MagicMotion/FlashMotion family (mask maps and
box maps); the endless seeded stream of them; and the clip shape of a
config. Scene files and folders of your own clips are read by scenes.py;
video.py draws and writes clips.

Conventions. Pixel coordinates, origin top-left, x to the right; pixel (row i,
column j) has its centre at (j + 0.5, i + 0.5). A box is [x0, y0, x1, y1] with
the object covering columns x0 <= x < x1 and rows y0 <= y < y1. Objects are
listed back to front: a later object occludes an earlier one.

    python data.py                     # previews/data.gif: random scenes, boxes drawn, with their maps
    python data.py --config=small --n=4 --out=preview.gif
"""

import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.data import IterableDataset, get_worker_info

from common import parse_flags, require_at_least, require_one_of
from model import CLIP_SHAPES
from video import ID_COLORS, check_video_path, draw_boxes, maps_to_uint8, save_video, to_uint8, upscale, video_grid

# Every shape a scene file may hold (shape_mask draws each). The world's random scenes
# draw from the first five, those FlashBench's feature network (fvd.py) was trained to
# tell apart: a shape added at the end is one more for scene files, and changes neither
# the training stream nor the held-out scenes (docs/course.md, lab 1's exercise).
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
RANDOM_SHAPES = SHAPES[:5]
BACKGROUNDS = ("solid", "gradient", "noise", "stripes")
TRAJECTORIES = ("straight", "curved", "bounce", "stop_and_go")
MAX_OBJECTS = 6
HELD_OUT_SEED = 1_000_003  # scenes for samples and evaluation; training uses seeds 0, 1, ...

def video_shape(config):
    """{frames, size} of a config (model.CLIP_SHAPES), by name or as anything with
    .frames and .size (a model.DiTConfig): what SpriteWorld takes."""
    if isinstance(config, str):
        return dict(CLIP_SHAPES[config])
    return {"frames": config.frames, "size": config.size}

# Saturated, mutually distinct object colours. Backgrounds are kept desaturated
# (see random_background_colors), so a simple colour match segments objects.
OBJECT_COLORS = np.array([
    [230, 40, 40], [40, 200, 60], [50, 90, 240], [240, 210, 30],
    [220, 50, 220], [30, 210, 220], [250, 130, 20], [150, 70, 240],
], dtype=np.uint8)

# ------------------------------------------------------------------ scenes --

@dataclass
class SceneObject:
    shape: str
    color: tuple          # (r, g, b) in 0..255
    size: float           # extent in pixels (diameter of the circle)
    centers: np.ndarray   # (T, 2) float, x and y of the centre per frame
    free: bool = False    # moves on a path no trajectory map shows: the generator's to invent


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


def random_scene(rng, frames, size, n_objects=None, n_free=0, max_free=0):
    """A fresh random scene: 1-6 objects of distinct colours and random paths,
    then n_free free ones in front of them (or 0 to max_free, at random), as
    many as fit in MAX_OBJECTS."""
    n = int(n_objects or rng.integers(1, MAX_OBJECTS + 1))
    n_free = min(n_free, MAX_OBJECTS - n)
    if max_free and not n_free:
        n_free = int(rng.integers(0, min(max_free, MAX_OBJECTS - n) + 1))
    colors = rng.choice(len(OBJECT_COLORS), n + n_free, replace=False)
    scale = size / 32
    objects = []
    for k in range(n + n_free):
        obj_size = rng.uniform(4, 10) * scale
        margin = obj_size / 2
        centers = random_trajectory(rng, rng.choice(TRAJECTORIES), frames, margin, size - margin)
        objects.append(SceneObject(str(rng.choice(RANDOM_SHAPES)), tuple(int(c) for c in OBJECT_COLORS[colors[k]]),
                                   float(obj_size), centers, free=k >= n))
    background = {"kind": str(rng.choice(BACKGROUNDS)), "seed": int(rng.integers(1 << 31))}
    return Scene(size=size, frames=frames, background=background, objects=objects)


# --------------------------------------------------------------- rendering --

@dataclass
class Rendered:
    video: np.ndarray    # (T, H, W, 3) float in [0, 1]; for user scenes only frame 0 is real
    masks: np.ndarray    # (K, T, H, W) bool, visible part of each object (after occlusion)
    boxes: np.ndarray    # (K, T, 4) float, box of the whole object (amodal)
    colors: np.ndarray   # (K, 3) uint8, the objects' own colours
    controlled: np.ndarray = None  # (K,) bool: False for free objects, which no trajectory map shows
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
    controlled = np.array([not o.free for o in scene.objects])
    return Rendered(video.astype(np.float32), visible, boxes, colors, controlled)


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


def trajectory_maps(masks, boxes, size, controlled=None):
    """The adapter's conditions, each (T, 3, H, W) float in [0, 1] on black:
    mask maps (visible masks in ID colours) and box maps (filled boxes in ID
    colours, back to front), whose first frame is the segmentation mask.
    Only the controlled objects are drawn (default: all); a free one is not."""
    K, T = masks.shape[:2]
    mask_maps = np.zeros((T, size, size, 3), dtype=np.float32)
    box_maps = np.zeros((T, size, size, 3), dtype=np.float32)
    for k in range(K):
        if controlled is not None and not controlled[k]:
            continue
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
    (MAX_OBJECTS, 3), controlled (MAX_OBJECTS,) bool (False for free objects
    and empty slots), n_objects ()."""
    K, T = rendered.masks.shape[:2]
    is_controlled = np.ones(K, dtype=bool) if rendered.controlled is None else rendered.controlled
    mask_maps, box_maps = trajectory_maps(rendered.masks, rendered.boxes, size, is_controlled)
    masks = np.zeros((MAX_OBJECTS, T, size, size), dtype=bool)
    boxes = np.zeros((MAX_OBJECTS, T, 4), dtype=np.float32)
    colors = np.zeros((MAX_OBJECTS, 3), dtype=np.uint8)
    controlled = np.zeros(MAX_OBJECTS, dtype=bool)
    masks[:K], boxes[:K], colors[:K], controlled[:K] = rendered.masks, rendered.boxes, rendered.colors, is_controlled
    video = rearrange(rendered.video, "t h w c -> t c h w") * 2 - 1
    return {
        "video": torch.from_numpy(np.ascontiguousarray(video)),
        "mask_maps": mask_maps, "box_maps": box_maps,
        "masks": torch.from_numpy(masks), "boxes": torch.from_numpy(boxes),
        "colors": torch.from_numpy(colors), "controlled": torch.from_numpy(controlled), "n_objects": torch.tensor(K),
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
    """Fresh random scenes, `n_objects` controlled ones per scene (random 1..6
    when None), and n_free free ones (or 0 to max_free at random) in front."""

    def __init__(self, frames, size, batch_size, seed=0, rank=0, start=0, n_objects=None, n_free=0, max_free=0):
        super().__init__(batch_size, seed, rank, start)
        self.frames, self.size, self.n_objects, self.n_free, self.max_free = frames, size, n_objects, n_free, max_free

    def scene(self, rng):
        return random_scene(rng, self.frames, self.size, self.n_objects, self.n_free, self.max_free)

    def scenes(self, index):
        """The scenes behind batch `index`, as data.Scene objects."""
        return [self.scene(self.rng(index, j)) for j in range(self.batch_size)]

    def sample(self, rng):
        return to_sample(render(self.scene(rng)), self.size)


# ----------------------------------------------------------------- preview --

def preview_sample(sample, factor=4):
    """One row of a preview: video with target boxes, box maps, mask maps."""
    n = int(sample["n_objects"])
    boxes = sample["boxes"][:n].numpy()
    return [draw_boxes(to_uint8(sample["video"]), boxes, factor),
            upscale(maps_to_uint8(sample["box_maps"]), factor),
            upscale(maps_to_uint8(sample["mask_maps"]), factor)]


FLAGS = dict(
    config=("tiny", "micro | tiny | small: the clip shape (model.CLIP_SHAPES)"),
    n=(6, "how many random scenes"),
    seed=(0, "seed of the scenes"),
    out=("previews/data.gif", "the preview, .gif or .mp4"),
)

if __name__ == "__main__":
    opt = parse_flags(FLAGS, sys.argv[1:], __doc__)
    require_one_of(opt, "config", CLIP_SHAPES)
    require_at_least(opt, ("n",))
    check_video_path(opt.out)
    batch = SpriteWorld(**video_shape(opt.config), batch_size=opt.n, seed=opt.seed).batch(0)
    rows = [preview_sample({k: v[i] for k, v in batch.items()}) for i in range(opt.n)]
    save_video(opt.out, video_grid(rows, labels=["video, target boxes", "box maps", "mask maps"]))
    print(f"wrote {opt.out}: {opt.n} scenes (video with boxes | box maps | mask maps)")
