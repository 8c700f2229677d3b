import json
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest

MICRO_SCENE = {"size": 16, "frames": 4, "background": {"kind": "solid", "seed": 1},
               "objects": [{"shape": "square", "color": [230, 40, 40], "size": 5, "path": [[4, 4], [12, 12]]}]}


def sample(folder, *args):
    return subprocess.run([sys.executable, "sample.py", "--config", "micro", "--checkpoints", str(folder),
                           "--scene", str(folder / "scene.json"), *args], capture_output=True, text=True)


def test_same_seed_same_video_other_seed_other_video(micro_folder):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = str(micro_folder / f"{name}.gif")
        result = sample(micro_folder, "--method", "naive", "--seed", str(seed), "--out", out)
        assert result.returncode == 0, result.stderr[-2000:]
        assert f"{name}.gif" in result.stdout
    a, b, c = (iio.imread(micro_folder / f"{name}.gif") for name in "abc")
    assert a.shape[0] == 4 and np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize("args, message", [
    (["--method", "best"], "unknown method 'best'"),
    (["--method", "flashmotion"], "hybrid_finetune.py"),
    (["--method", "naive", "--steps", "8"], "--steps must be 4"),
    (["--adapter", "dora"], "--adapter must be"),
    (["--condition", "dots"], "--condition must be"),
    (["--method", "naive", "--condition", "box"], "slow_adapter_controlnet_micro.pt, which is missing"),
    (["--seed", "x"], "--seed must be a whole number"),
])
def test_bad_flags_exit_with_one_line_and_write_nothing(micro_folder, args, message):
    result = sample(micro_folder, *args, "--out", str(micro_folder / "out.gif"))
    assert result.returncode == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (micro_folder / "out.gif").exists()


def test_bad_scene_is_refused_naming_the_field(micro_folder):
    bad = dict(MICRO_SCENE, objects=[dict(MICRO_SCENE["objects"][0], shape="star")])
    (micro_folder / "scene.json").write_text(json.dumps(bad))
    result = sample(micro_folder, "--method", "naive", "--out", str(micro_folder / "out.gif"))
    assert result.returncode == 1 and "'objects[0].shape'" in result.stderr and "Traceback" not in result.stderr
    assert not (micro_folder / "out.gif").exists()


def test_each_family_writes_its_own_file_by_default():
    import sample
    from common import parse_flags
    out = lambda *argv: sample.default_out(parse_flags(sample.FLAGS, list(argv), ""))
    assert out() == "samples/flashmotion_default.gif"
    assert len({out(), out("--condition=box"), out("--adapter=lora"), out("--adapter=lora", "--condition=box")}) == 4
