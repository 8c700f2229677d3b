"""What a new user runs into: --help everywhere, and wrong input answered with
one line that names what is wrong, before any work, with nothing written."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

import bench
import common
import demo
import distill
import hybrid_finetune
import sample
import train
import train_adapter
import train_autoencoder
import train_fvd
from test_sample import MICRO_SCENE

SCRIPTS = {"train": train, "train_adapter": train_adapter, "distill": distill, "hybrid_finetune": hybrid_finetune,
           "train_fvd": train_fvd, "train_autoencoder": train_autoencoder, "sample": sample, "bench": bench,
           "demo": demo}
HAS_FFMPEG = importlib.util.find_spec("imageio_ffmpeg") is not None


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_stage_script_answers_help_with_its_flags_and_defaults(name, capsys):
    script = SCRIPTS[name]
    with pytest.raises(SystemExit) as exit_:
        script.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag, (default, help_line) in script.FLAGS.items():
        shown = "(not set)" if isinstance(default, type) else default
        assert f"--{flag}={shown}" in text and help_line in text, flag


@pytest.mark.parametrize("script", ["data.py", "attention.py"])
def test_the_other_scripts_answer_help_and_refuse_unknown_flags(script):
    result = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and f"python {script}" in result.stdout
    result = subprocess.run([sys.executable, script, "--colour=red"], capture_output=True, text=True)
    assert result.returncode == 1 and "unknown option --colour" in result.stderr
    assert "Traceback" not in result.stderr


def run_sample(folder, *args):
    """sample.main in this process: (exit message or None)."""
    try:
        sample.main(["--config=micro", f"--checkpoints={folder}", f"--scene={folder / 'scene.json'}",
                     "--method=naive", *args])
    except SystemExit as e:
        return str(e.code)
    return None


@pytest.mark.parametrize("args, message", [
    (["--out=/proc/x.gif"], "/proc/x.gif: cannot write in /proc"),
    (["--seed=99999999999999999999"], "--seed must be a whole number from 0 to 4294967295"),
    (["--seed=-1"], "--seed must be a whole number from 0"),
    (["--steps=0"], "--steps must be at least 1"),
    (["--guidance=nan"], "--guidance must be a finite number"),
    (["--out=clip.png"], "clip.png: the video must be a .gif or an .mp4 file"),
    (["--device=tpu"], "--device must be cpu or cuda"),
    (["--method=teacher", "--steps=-3"], "--steps must not be negative"),
])
def test_bad_sample_flags_are_refused_before_any_work(micro_folder, args, message):
    assert message in run_sample(micro_folder, *args)
    assert not list(micro_folder.glob("*.gif"))


def test_mp4_with_the_ffmpeg_plugin_or_one_line_without_it(micro_folder):
    out = micro_folder / "clip.mp4"
    error = run_sample(micro_folder, f"--out={out}")
    if HAS_FFMPEG:
        import imageio.v3 as iio
        assert error is None and iio.imread(out, index=None, plugin="FFMPEG").shape[0] == 4
    else:
        assert "pip install imageio-ffmpeg" in error and not out.exists()


@pytest.mark.parametrize("field, value, named", [
    ("size", "big", "'objects[0].size'"),
    ("color", [300, 0, 0], "'objects[0].color'"),
    ("path", [[4, 4], [12, "x"]], "'objects[0].path[1]'"),
    ("path", [[4, 4], [1e400, 3]], "'objects[0].path[1]'"),
])
def test_a_wrong_object_field_is_named(micro_folder, field, value, named):
    scene = dict(MICRO_SCENE, objects=[dict(MICRO_SCENE["objects"][0], **{field: value})])
    (micro_folder / "scene.json").write_text(json.dumps(scene))
    assert named in run_sample(micro_folder)


def test_wrong_scene_files_are_named(micro_folder):
    scene = dict(MICRO_SCENE, size="big", background={"kind": "solid", "seed": -1})
    (micro_folder / "scene.json").write_text(json.dumps(scene))
    error = run_sample(micro_folder)
    assert "'size'" in error and "'background.seed'" in error
    (micro_folder / "scene.json").write_text("[" * 5000 + "]" * 5000)
    assert "scene.json: nested too deeply to be a scene" in run_sample(micro_folder)
    (micro_folder / "scene.json").unlink()
    (micro_folder / "scene.json").mkdir()
    assert "scene.json: cannot read it" in run_sample(micro_folder)


@pytest.mark.parametrize("content", ["truncated", "text", "code"])
def test_a_broken_checkpoint_is_named_with_the_command_that_makes_it(micro_folder, content):
    path = micro_folder / "fast_generator_micro.pt"
    if content == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    elif content == "text":
        path.write_text("not a checkpoint")
    else:  # a pickle that would run code: weights_only refuses it
        torch.save({"kind": "fast_generator", "hook": common.Run}, path)
    error = run_sample(micro_folder)
    assert str(path) in error and "python distill.py" in error and "not a readable checkpoint" in error


def test_bench_refuses_bad_outputs_and_counts_before_any_work(micro_folder, capsys):
    for args, message in [(["--json=/proc/r.json"], "/proc/r.json: cannot write"),
                          (["--gif=/proc/b.gif"], "/proc/b.gif: cannot write"),
                          (["--gif=b.avi"], "b.avi: the video must be"),
                          (["--scenes_per_count=0"], "--scenes_per_count must be at least 1"),
                          (["--methods=naive,best"], "unknown method 'best'"),
                          (["--instruments=true", "--scenes=scenes"], "--instruments measures held-out real clips")]:
        with pytest.raises(SystemExit, match=message):
            bench.main(["--config=micro", f"--checkpoints={micro_folder}", *args])
    assert "naive:" not in capsys.readouterr().err  # nothing was generated


def test_a_user_error_exits_with_one_line_and_no_traceback(micro_folder):
    result = subprocess.run([sys.executable, "sample.py", "--config=micro", f"--checkpoints={micro_folder}",
                             f"--scene={micro_folder / 'scene.json'}", "--out=/proc/x.gif"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--out_dir=/proc/run"], "/proc/run/ckpt.pt: cannot write in /proc"),
    (["--out_dir=README.md/run"], "README.md is a file, not a folder"),
    (["--lr=-1"], "--lr must be a finite number, not negative"),
    (["--num_workers=-1"], "--num_workers must not be negative"),
])
def test_a_training_run_refuses_bad_flags_and_outputs_before_it_starts(args, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        train.main(["--config=micro", f"--out_dir={tmp_path / 'run'}", *args])
    assert not (tmp_path / "run").exists()
