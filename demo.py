"""Draw a path, watch it move: a local page over sample.py's registry.

    python demo.py                        # then open http://127.0.0.1:8000
    python demo.py --port=8080 --adapter=lora

The page (demo/) shows a first frame: one of scenes/*.json, a random sprite
world scene by seed, or a scene file of your own. Drag from an object to
draw its path (or click it and pick a preset), choose a method, Generate:
the clip plays, with its time, beside the last ones. The page talks to one
API, which is sample.py's code path:

    POST /api/generate  {"scene": <scene file JSON>, "method": "flashmotion", "seed": 0, "boxes": true}
         -> image/gif: the bytes `python sample.py --scene S --method M --seed N` writes;
            the header X-Seconds holds the generation time
    POST /api/first_frame  {"scene": ...}  -> its first frame (a PNG data URL) and each object's box
    POST /api/random_scene {"seed": N}     -> a scene of the sprite world, as a scene file
    GET  /api/info                         -> the methods, the example scenes, the clip shape
    GET  /api/progress                     -> the network calls done and due for the clip being made

Bad input gets a 4xx with {"error": ...} naming the field, a body over 1 MB
413; the server keeps serving. A scene names no file of the server: its own
first frame travels in the request, as a PNG data URL. The models load once,
at start, and one clip is computed at a time. It binds to 127.0.0.1 unless
--host says otherwise (there is no authentication).
"""

import base64
import glob
import json
import os
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import imageio.v3 as iio
import numpy as np

import data
import scenes
from common import UserError, parse_flags, set_threads
from sample import METHODS, ROLE_FLAGS, available_methods, check_family, load_method, own_files, sample_frames
from video import gif_bytes, to_uint8

FLAGS = dict(
    port=(8000, "the port to serve on (0: any free one)"),
    host=("127.0.0.1", "the address to bind; 127.0.0.1 serves this machine only"),
    checkpoints=("checkpoints", "the folder of the checkpoints"),
    config=("tiny", "micro | tiny | small: which checkpoints"),
    adapter=("", "controlnet | lora | resnet: the adapter family; default: an adapter run's, else controlnet"),
    condition=("", "mask | box: the maps the adapters read; default: an adapter run's, else mask"),
    threads=(0, "CPU threads; 0: half the cores (common.set_threads)"),
    **ROLE_FLAGS,
)
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo")
PAGE_FILES = {"/": ("index.html", "text/html; charset=utf-8"), "/demo.js": ("demo.js", "text/javascript"),
              "/demo.css": ("demo.css", "text/css")}  # all the server serves besides its API
MAX_BODY = 1 << 20  # bytes of a request: a scene with its own first frame fits easily
GUIDANCE = 3.0  # the Euler methods' trajectory guidance: sample.py's default


class ApiError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Demo:
    """What the requests share: the methods, loaded once; a lock, so that one
    clip is computed at a time; the progress of the clip being made."""

    def __init__(self, opt):
        check_family(opt)  # an adapter run given names its adapter and maps
        self.opt = opt
        shape = data.video_shape(opt.config)
        self.size, self.frames = shape["size"], shape["frames"]
        available = available_methods(opt)
        if not available:
            raise UserError(f"no method has its checkpoints in {opt.checkpoints}/: run bash pipeline.sh {opt.config}")
        self.methods = {name: load_method(name, opt.config, opt.adapter, opt.condition, opt.checkpoints,
                                          files=own_files(opt)) for name in available}
        self.examples = {os.path.splitext(os.path.basename(path))[0]: scenes.read_json(path)
                         for path in sorted(glob.glob("scenes/*.json"))}
        self.lock = threading.Lock()
        self.progress = {"method": None, "done": 0, "total": 0}

    def info(self):
        return {"size": self.size, "frames": self.frames, "default": "flashmotion",
                "methods": [{"name": name, "steps": m.steps, "nfe": m.nfe(GUIDANCE)}
                            for name, m in self.methods.items()],
                "scenes": {name: spec for name, spec in self.examples.items()
                           if spec.get("size") == self.size and spec.get("frames") == self.frames}}

    def scene(self, body):
        """The request's scene, checked as sample.py checks a scene file: (data.Scene, a batch of one)."""
        if "scene" not in body:
            raise ApiError(HTTPStatus.BAD_REQUEST, "'scene': missing (a scene file's JSON)")
        scene = scenes.parse_scene(body["scene"], name="scene", allow_files=False)
        return scene, data.collate([scenes.scene_sample(scene, self.opt.config, "scene")])

    def generate(self, body):
        """The GIF sample.py writes for the request, and its seconds of generation."""
        name, seed, boxes = body.get("method", "flashmotion"), seed_of(body), body.get("boxes", True)
        if not isinstance(name, str) or name not in METHODS:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"unknown method '{name}' (known: {', '.join(METHODS)})")
        if name not in self.methods:
            raise ApiError(HTTPStatus.BAD_REQUEST, f"method '{name}' has no checkpoints here (available: "
                                                   f"{', '.join(self.methods)})")
        if not isinstance(boxes, bool):
            raise ApiError(HTTPStatus.BAD_REQUEST, "'boxes': must be true or false")
        _, batch = self.scene(body)
        method = self.methods[name]
        with self.lock:
            self.progress.update(method=name, done=0, total=method.nfe(GUIDANCE))
            counting = method.model.register_forward_hook(lambda *_: self.progress.update(
                done=self.progress["done"] + 1))
            try:
                frames, seconds, _ = sample_frames(method, batch, guidance=GUIDANCE, seed=seed, boxes=boxes)
            finally:
                counting.remove()
        return gif_bytes(frames), seconds

    def first_frame(self, body):
        """The scene's first frame as a PNG data URL, and where each object is in it."""
        scene, batch = self.scene(body)
        frame = to_uint8(batch["video"][0, :1])[0]  # (H, W, 3)
        png = scenes.PNG_DATA_URL + base64.b64encode(iio.imwrite("<bytes>", frame, extension=".png")).decode()
        boxes = batch["boxes"][0, :int(batch["n_objects"][0]), 0].tolist()  # (K, 4) in frame 0
        centers = [obj.centers[0].tolist() for obj in scene.objects] or \
            [[(x0 + x1) / 2, (y0 + y1) / 2] for x0, y0, x1, y1 in boxes]
        free = [obj.free for obj in scene.objects] or [False] * len(boxes)
        return {"image": png, "objects": [{"box": b, "center": c, "free": f} for b, c, f in zip(boxes, centers, free)]}

    def random_scene(self, body):
        """A scene of the sprite world, as a scene file, drawn by the request's seed."""
        return scenes.scene_to_json(data.random_scene(np.random.default_rng(seed_of(body)), self.frames, self.size))


def seed_of(body):
    """The request's "seed" (default 0), a whole number as sample.py's --seed."""
    seed = body.get("seed", 0)
    if not (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2 ** 32):
        raise ApiError(HTTPStatus.BAD_REQUEST, f"'seed': must be a whole number from 0 to {2 ** 32 - 1}")
    return seed


class Handler(BaseHTTPRequestHandler):
    """The page's own files and the API; every error is a JSON answer, never a traceback."""

    server_version = "FlashMotionDemo"

    def do_GET(self):
        self.answer(lambda: self.get(self.path.split("?")[0]))

    def do_POST(self):
        self.answer(lambda: self.post(self.path.split("?")[0]))

    def get(self, path):
        demo = self.server.demo
        if path in PAGE_FILES:
            name, kind = PAGE_FILES[path]
            with open(os.path.join(PAGE, name), "rb") as f:
                return HTTPStatus.OK, kind, f.read(), {}
        if path == "/api/info":
            return self.json(demo.info())
        if path == "/api/progress":
            return self.json(dict(demo.progress))
        raise ApiError(HTTPStatus.NOT_FOUND, f"not found: {path}")

    def post(self, path):
        demo = self.server.demo
        if path == "/api/generate":
            gif, seconds = demo.generate(self.body())
            return HTTPStatus.OK, "image/gif", gif, {"X-Seconds": f"{seconds:.4f}"}
        routes = {"/api/first_frame": demo.first_frame, "/api/random_scene": demo.random_scene}
        if path not in routes:
            raise ApiError(HTTPStatus.NOT_FOUND, f"not found: {path}")
        return self.json(routes[path](self.body()))

    def body(self):
        """The request's JSON object, read only when it is at most MAX_BODY bytes."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "a request body needs its Content-Length")
        if int(length) > MAX_BODY:
            if int(length) <= 8 * MAX_BODY:  # drained, so that a client still sending reads the 413, not a broken pipe
                self.rfile.read(int(length))
            else:
                self.close_connection = True  # too large to drain: left unread
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body is over {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(int(length)))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deeply
            raise ApiError(HTTPStatus.BAD_REQUEST, f"malformed JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "the body must be a JSON object")
        return body

    @staticmethod
    def json(value, status=HTTPStatus.OK):
        return status, "application/json", json.dumps(value).encode(), {}

    def answer(self, handle):
        start = time.perf_counter()
        try:
            status, kind, payload, headers = handle()
        except ApiError as e:
            status, kind, payload, headers = self.json({"error": str(e)}, e.status)
        except UserError as e:  # a wrong scene: sample.py's message, without its "error: "
            status, kind, payload, headers = self.json({"error": str(e.code).removeprefix("error: ")},
                                                       HTTPStatus.BAD_REQUEST)
        except Exception:
            traceback.print_exc()  # for the server's log; the client learns only that it failed
            status, kind, payload, headers = self.json({"error": "internal error (the server's log has it)"},
                                                       HTTPStatus.INTERNAL_SERVER_ERROR)
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)
        self.log_message("%s %s %d %.2f s", self.command, self.path, status, time.perf_counter() - start)

    def log_request(self, code="-", size="-"):  # answer() logs each request once, with its time
        pass


def serve(opt):
    """A started server (in this thread, call serve_forever) with the demo's models loaded."""
    server = ThreadingHTTPServer((opt.host, opt.port), Handler)  # the port first: a taken one fails at once
    server.daemon_threads = True
    try:
        server.demo = Demo(opt)
    except BaseException:
        server.server_close()
        raise
    return server


def main(argv):
    opt = parse_flags(FLAGS, argv, __doc__)
    threads = set_threads(opt.threads)
    try:
        server = serve(opt)
    except OSError as e:
        raise UserError(f"cannot serve on {opt.host}:{opt.port} ({e.strerror})") from None
    host, port = server.server_address[:2]
    print(f"FlashMotion demo: http://{host}:{port}  ({len(server.demo.methods)} methods, {threads} thread(s); "
          f"Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()


if __name__ == "__main__":
    main(sys.argv[1:])
