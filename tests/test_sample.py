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
        assert f"{name}.gif" in result.stdout and "mask IoU" in result.stdout  # measured against the scene
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


def default_out(*argv):
    """Where sample.py writes by default for these flags."""
    import sample
    from common import parse_flags
    opt = parse_flags(sample.FLAGS, list(argv), "")
    sample.check_family(opt)
    return sample.default_out(opt)


def test_each_family_writes_its_own_file_by_default():
    out = default_out
    assert out() == "samples/flashmotion_default.gif"
    assert len({out(), out("--condition=box"), out("--adapter=lora"), out("--adapter=lora", "--condition=box")}) == 4


def test_a_runs_own_checkpoint_stands_in_for_the_folders_and_a_wrong_pairing_is_refused(micro_folder):
    import common
    slow_adapter = common.load_checkpoint(micro_folder / "slow_adapter_controlnet_mask_micro.pt")
    run = micro_folder / "runs" / "mine"
    run.mkdir(parents=True)
    for parent, name in (("fast-run", "ckpt.pt"), ("other-run", "stranger.pt")):  # a stage-3 run, another's
        common.save_checkpoint(run / name, slow_adapter | {"kind": "fast_adapter", "parent": parent,
                                                           "parent_path": "fast.pt"})
    out = micro_folder / "mine.gif"
    missing = sample(micro_folder, "--method", "flashmotion", "--out", str(out))
    assert missing.returncode == 1 and "fast_adapter_hybrid_controlnet_mask_micro.pt" in missing.stderr
    mine = sample(micro_folder, "--method", "flashmotion", f"--fast_adapter={run / 'ckpt.pt'}", "--out", str(out))
    assert mine.returncode == 0 and out.exists(), mine.stderr[-2000:]
    (micro_folder / "fast_generator_micro.pt").rename(run / "fast.pt")  # the generator from elsewhere too
    mine = sample(micro_folder, "--method", "flashmotion", f"--fast_generator={run / 'fast.pt'}",
                  f"--fast_adapter={run / 'ckpt.pt'}", "--out", str(micro_folder / "again.gif"))
    assert mine.returncode == 0 and np.array_equal(iio.imread(out), iio.imread(micro_folder / "again.gif"))
    wrong = sample(micro_folder, "--method", "flashmotion", f"--fast_generator={run / 'fast.pt'}",
                   f"--fast_adapter={run / 'stranger.pt'}", "--out", str(micro_folder / "wrong.gif"))
    assert wrong.returncode == 1 and "other-run" in wrong.stderr and len(wrong.stderr.strip().splitlines()) == 1
    assert not (micro_folder / "wrong.gif").exists()


def test_default_outputs_name_the_run_and_what_is_not_the_default(micro_folder):
    import common
    run = micro_folder / "runs" / "lab_slow_adapter"
    run.mkdir(parents=True)
    shipped = micro_folder / "slow_adapter_controlnet_mask_micro.pt"
    common.save_checkpoint(run / "ckpt.pt", common.load_checkpoint(shipped))
    out = lambda *args: default_out("--config=micro", f"--checkpoints={micro_folder}", "--scene=scenes/crossing.json",
                                    *args)
    assert out() == "samples/flashmotion_crossing.gif"
    mine = f"--slow_adapter={run / 'ckpt.pt'}"
    assert out("--method=naive", mine) == "samples/naive_crossing_lab_slow_adapter.gif"
    assert out("--method=fast-generator", mine) == "samples/fast-generator_crossing.gif"  # the run is not read
    # Lab 3's two guidance runs: two files.
    assert out("--method=teacher", mine, "--guidance=1") == "samples/teacher_crossing_lab_slow_adapter_guidance1.gif"
    assert out("--method=teacher", mine) == "samples/teacher_crossing_lab_slow_adapter.gif"
    assert out("--seed=2", "--method=naive") == "samples/naive_crossing_seed2.gif"
    assert out("--steps=4") == out() and out("--method=teacher", "--steps=20") == "samples/teacher_crossing_steps20.gif"


@pytest.mark.parametrize("method, role", [("dmd-joint", "dmd_joint"), ("lcm", "lcm_joint")])
def test_each_family_has_its_own_joint_pair(method, role):
    """dmd-joint and lcm distil one controlled model: the LoRA or ResNet family never borrows the ControlNet's."""
    from sample import checkpoint_paths
    paths = {(kind, maps): checkpoint_paths(method, "tiny", kind, maps)[0]
             for kind in ("controlnet", "lora", "resnet") for maps in ("mask", "box")}
    assert paths[("controlnet", "mask")] == f"checkpoints/{role}_mask_tiny.pt"  # the shipped names
    assert paths[("controlnet", "box")] == f"checkpoints/{role}_tiny.pt"
    assert paths[("resnet", "mask")] == f"checkpoints/{role}_resnet_mask_tiny.pt"
    assert len(set(paths.values())) == 6
