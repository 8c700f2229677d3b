"""What a user gives: scene files (JSON) and folders of their own clips.

A scene file describes a first frame and a trajectory per object, in pixel
coordinates (origin top-left, x to the right), objects back to front:

    {"size": 32, "frames": 16, "background": {"kind": "gradient", "seed": 3},
     "objects": [{"shape": "circle", "color": [230, 40, 40], "size": 7,
                  "path": [[6, 6], [16, 24], [26, 8]]}]}

`path` is key points travelled at constant speed, or one point per frame;
an object with "free": true moves along it on its own: no trajectory map
shows it (the content the generator must invent) and no IoU scores it. Or
your own first frame ("first_frame": "img.png", or the PNG itself as a data
URL) and per object per-frame "boxes". A scene that is wrong anywhere is
refused with every wrong field named; nothing is generated from a half-read
scene.

    python scenes.py --scene=my_scene.json     # previews/my_scene.gif: the scene as drawn, its maps; no model
"""

import base64
import binascii
import json
import os
import sys

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

import data
from common import UserError, parse_flags
from video import check_video_path, save_video, video_grid

PNG_DATA_URL = "data:image/png;base64,"
MAX_IMAGE_SIDE = 1024  # pixels: a first frame is read only up to this size (it is shrunk to the clip's)


# ------------------------------------------------------------- scene files --

def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it as a text file ({getattr(e, 'strerror', None) or e.reason})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:  # Python's JSON reader recurses once per bracket
        raise UserError(f"{path}: nested too deeply to be a scene") from None


def load_scene(path):
    """Read, validate and interpret a scene file. Every problem is collected and
    reported together, each with the field it concerns; nothing is rendered
    from a scene that is wrong anywhere."""
    return parse_scene(read_json(path), base_dir=os.path.dirname(os.path.abspath(path)), name=path)


def parse_scene(spec, base_dir=".", name="scene", allow_files=True):
    """A data.Scene from a scene file's JSON; allow_files False refuses a
    first frame given as a file path (a scene sent to a server names no file
    of the server's)."""
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
        if background.get("kind") not in data.BACKGROUNDS:
            err(f"'background.kind': must be one of {', '.join(data.BACKGROUNDS)}")
        if not is_int(background.get("seed", 0)) or not 0 <= background.get("seed", 0) < 2 ** 32:
            err(f"'background.seed': must be a whole number from 0 to {2 ** 32 - 1}")
        if "color" in background and not is_color(background["color"]):
            err("'background.color': must be [r, g, b] with each value 0..255")

    first_frame = None
    user_image = "first_frame" in spec
    if user_image:
        source = spec["first_frame"]
        if not isinstance(source, str):
            err("'first_frame': must be the path of an image file, or a PNG data URL")
        elif not allow_files and not source.startswith(PNG_DATA_URL):
            err("'first_frame': a path names a file here; send the image itself, as a PNG data URL")
        elif size is not None:
            first_frame = read_first_frame(source, base_dir, size, err)

    objects = spec.get("objects")
    parsed, user_boxes = [], []
    if not isinstance(objects, list) or not 1 <= len(objects) <= data.MAX_OBJECTS:
        err(f"'objects': must be a list of 1 to {data.MAX_OBJECTS} objects")
        objects = []
    for k, obj in enumerate(objects):
        where = f"objects[{k}]"
        if not isinstance(obj, dict):
            err(f"'{where}': must be an object")
            continue
        if user_image:
            user_boxes.append(parse_user_boxes(obj, where, size, frames, err))
        else:
            parsed.append(parse_object(obj, where, size, frames, errors))

    if errors:
        raise UserError(f"{name}: " + "; ".join(errors))
    scene = data.Scene(size=size, frames=frames, background=background, objects=parsed)
    if user_image:
        scene.first_frame, scene.user_boxes = first_frame, np.stack(user_boxes)
    return scene


def parse_object(obj, where, size, frames, errors):
    """A SceneObject, or None with the wrong fields added to `errors`."""
    err, errors_before = errors.append, len(errors)
    for key in obj:
        if key not in ("shape", "color", "size", "path", "free"):
            err(f"'{where}.{key}': unknown field (known: shape, color, size, path, free)")
    if not isinstance(obj.get("free", False), bool):
        err(f"'{where}.free': must be true or false")
    if obj.get("shape") not in data.SHAPES:
        err(f"'{where}.shape': must be one of {', '.join(data.SHAPES)}")
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
    if len(errors) > errors_before or frames is None:
        return None
    points = np.asarray(points, dtype=np.float64)
    if len(points) != frames:  # key points: constant speed along the polyline
        points = data.resample_polyline(points, np.linspace(0, 1, frames))
    return data.SceneObject(obj["shape"], tuple(obj["color"]), float(obj_size), points, obj.get("free", False))


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


def read_first_frame(source, base_dir, size, err):
    """The image of a file path (relative to the scene file) or of a PNG data
    URL, at most MAX_IMAGE_SIDE a side, shrunk to (size, size, 3) in [0, 1]."""
    if source.startswith(PNG_DATA_URL):
        try:
            uri, what = base64.b64decode(source[len(PNG_DATA_URL):], validate=True), "the PNG data URL"
        except binascii.Error:
            err("'first_frame': the data URL is not valid base64")
            return None
    else:
        uri = what = os.path.join(base_dir, source)
    extension = ".png" if isinstance(uri, bytes) else None  # bytes name no format; a file's name does
    try:
        shape = iio.improps(uri, extension=extension).shape  # header only
        if max(shape[:2]) > MAX_IMAGE_SIDE:
            err(f"'first_frame': {what} is {shape[1]}x{shape[0]}, more than {MAX_IMAGE_SIDE} pixels a side")
            return None
        image = np.asarray(iio.imread(uri, extension=extension))
    except Exception as e:
        err(f"'first_frame': cannot read image {what} ({e.__class__.__name__})")
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
                     "path": np.round(o.centers, 3).tolist(), **({"free": True} if o.free else {})}
                    for o in scene.objects],
    }


def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) < 1e9  # no inf, nan or 10**400


def is_color(v):
    return isinstance(v, list) and len(v) == 3 and all(is_int(c) and 0 <= c <= 255 for c in v)


def scene_batch(paths, config, need_truth=False):
    """Scene files -> one batch (data.collate's keys), every file read and
    checked before anything is generated. need_truth refuses scenes with a
    first frame of their own: they have no true clip and no object colours
    to measure."""
    return data.collate([scene_sample(load_scene(path), config, path, need_truth) for path in paths])


def scene_sample(scene, config, name, need_truth=False):
    """A parsed scene rendered as one sample (data.to_sample's keys) for the
    `config` models, whose clip shape it must have."""
    shape = data.video_shape(config)
    if (scene.size, scene.frames) != (shape["size"], shape["frames"]):
        raise UserError(f"{name}: 'size' {scene.size} and 'frames' {scene.frames} must be "
                        f"{shape['size']} and {shape['frames']} for the {config} models")
    rendered = data.render(scene)
    if need_truth and not rendered.has_video:
        raise UserError(f"{name}: a scene with its own 'first_frame' has no true clip to measure against; "
                        f"bench.py needs scenes drawn from objects (sample.py takes both)")
    return data.to_sample(rendered, scene.size)


# ---------------------------------------------------------- your own clips --

class ClipFolder(data.BatchStream):
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
            self.cache[path] = data.to_sample(load_clip(path, self.frames, self.size), self.size)
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
    if not isinstance(objects, list) or not 1 <= len(objects) <= data.MAX_OBJECTS:
        raise UserError(f"{boxes_path}: 'objects' must be a list of 1 to {data.MAX_OBJECTS} objects")
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
    rendered = data.render_user_scene(data.Scene(size, frames, first_frame=first_frame, user_boxes=boxes))
    rendered.video = rearrange(video.clamp(0, 1).numpy(), "t c h w -> t h w c")
    rendered.has_video = True
    return rendered


# ------------------------------------------------------------------ preview --

FLAGS = dict(
    scene=("scenes/default.json", "the scene file to preview"),
    out=("", "the preview, .gif or .mp4; default previews/<scene>.gif"),
)

if __name__ == "__main__":
    opt = parse_flags(FLAGS, sys.argv[1:], __doc__)
    out = opt.out or os.path.join("previews", os.path.splitext(os.path.basename(opt.scene))[0] + ".gif")
    check_video_path(out)
    scene = load_scene(opt.scene)
    sample = data.to_sample(data.render(scene), scene.size)
    save_video(out, video_grid([data.preview_sample(sample)], labels=["scene, target boxes", "box maps", "mask maps"]))
    print(f"wrote {out}: {opt.scene} as drawn (target boxes over it), its box maps and mask maps")
