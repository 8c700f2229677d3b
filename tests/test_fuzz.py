"""Bounded fuzzing of what a user sends: mutated scene files through the
scene reader and renderer, and mutated requests through the demo's API.
Every input gets a Scene or one UserError (a 4xx from the API), never a
traceback. Seeded, so a failure names its input and replays."""

import copy
import json
import random

import pytest

import scenes
from common import UserError
from test_demo import call, server  # noqa: F401  (server: the demo's fixture)
from test_sample import MICRO_SCENE

ODD_VALUES = [None, True, False, 0, -1, 3, 2 ** 40, 10 ** 30, -1e300, 0.5, float("nan"), float("inf"), "", "x",
              "circle", [], {}, [1, 2], [[1, 2]], [1, 2, 3], [[1, 2, 3]], {"kind": "solid"}, [None],
              "data:image/png;base64,AAAA", "data:image/png;base64,@@", "../checkpoints/x.pt", [0] * 300]


def deep(depth):
    value = []
    for _ in range(depth):
        value = [value]
    return value


def mutations(rng, scene, count):
    """`count` scenes, each the valid one with one to three random changes:
    a field replaced by an odd value, removed, or an unknown field added."""
    for _ in range(count):
        mutated = copy.deepcopy(scene)
        for _ in range(rng.randint(1, 3)):
            target, key = random_place(rng, mutated)
            choice = rng.random()
            if choice < 0.6:
                target[key] = copy.deepcopy(rng.choice(ODD_VALUES + [deep(rng.randint(10, 200))]))
            elif choice < 0.8 and isinstance(target, dict):
                target.pop(key, None)
            elif isinstance(target, dict):
                target[rng.choice(["extra", "Size", "path "])] = copy.deepcopy(rng.choice(ODD_VALUES))
        yield mutated


def random_place(rng, value):
    """A random (container, key) inside a JSON value, the top level included."""
    places = []

    def walk(node):
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for key, child in items:
            places.append((node, key))
            walk(child)
    walk(value)
    return rng.choice(places)


def test_mutated_scenes_are_read_or_refused_in_one_line():
    rng = random.Random(0)
    refused = 0
    for i, spec in enumerate(mutations(rng, MICRO_SCENE, 400)):
        spec = json.loads(json.dumps(spec))  # as a file would hold it (NaN and Infinity included)
        try:
            scenes.scene_sample(scenes.parse_scene(spec, allow_files=False), "micro", "scene")
        except UserError as e:
            refused += 1
            assert "\n" not in str(e.code), (i, spec)
        except Exception as e:  # anything else reaches the user as a traceback
            pytest.fail(f"mutation {i}: {spec!r:.300} raised {e!r}")
    assert 200 < refused < 400  # most mutations are wrong, some are still scenes


def test_mutated_requests_get_a_clip_or_a_4xx_and_the_server_keeps_serving(server):
    url, _ = server
    rng = random.Random(1)
    request = {"scene": MICRO_SCENE, "method": "naive", "seed": 0, "boxes": True}
    for i, body in enumerate(mutations(rng, request, 60)):
        raw = json.dumps(body).encode()
        for endpoint in ("/api/generate", "/api/first_frame"):
            status, _, payload = call(url + endpoint, raw=raw)
            assert status == 200 or 400 <= status < 500 and "error" in json.loads(payload), \
                (i, endpoint, raw[:300], status, payload[:300])
    status, _, payload = call(url + "/api/generate", request)
    assert status == 200, payload[:300]  # still serving
