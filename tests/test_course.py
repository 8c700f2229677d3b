"""docs/course.md is a course a class runs: every lab has its parts, its one
command is short (a named recipe, not a page of flags), and that command runs
here at micro size, with the micro checkpoints in place of the shipped ones."""

import os
import re
import shlex
import subprocess
import sys

import pytest

COURSE = open("docs/course.md").read()
LABS = re.findall(r"^## Lab (\d+): (.+?)$(.*?)(?=^## )", COURSE, re.M | re.S)
PARTS = ("**Question.**", "**Read.**", "**Run.**", "**You should see.**", "**Exercise.**")


def command_of(body):
    """The lab's command: the first line of its first bash block."""
    return re.search(r"```bash\n(.+?)\n", body).group(1)


def micro_flags(script, folder, out):
    """What makes a lab's command micro-sized: the micro config, the fixture's
    checkpoints and scene, two steps, and outputs under the test's folder."""
    ckpt = lambda role: f"{folder}/{role}_micro.pt"  # noqa: E731
    steps = ["--config=micro", "--max_steps=2", "--batch_size=2", "--sample_interval=2", f"--out_dir={out}"]
    return {
        "sample.py": ["--config=micro", f"--checkpoints={folder}", f"--scene={folder}/scene.json", f"--out={out}.gif"],
        "bench.py": ["--config=micro", f"--checkpoints={folder}", "--scenes_per_count=1", "--teacher_steps=3"],
        "train.py": [*steps, "--sample_steps=2", "--eval_scenes=2", f"--fid_encoder={ckpt('video_encoder')}"],
        "train_adapter.py": [*steps, f"--generator_ckpt={ckpt('slow_generator')}", "--eval_scenes=2",
                             "--sample_steps=2"],
        "distill.py": [*steps, f"--teacher_ckpt={ckpt('slow_generator')}", "--ratio=2",
                       f"--fid_encoder={ckpt('video_encoder')}"],
        "consistency.py": [*steps, f"--teacher_ckpt={ckpt('slow_generator')}", "--eval_scenes=2", "--teacher_steps=3",
                           f"--adapter_ckpt={ckpt('slow_adapter_controlnet_mask')}",
                           f"--fid_encoder={ckpt('video_encoder')}"],
        "hybrid_finetune.py": [*steps, f"--fast_generator_ckpt={ckpt('fast_generator')}", "--eval_scenes=2",
                               f"--slow_generator_ckpt={ckpt('slow_generator')}",
                               f"--adapter_ckpt={ckpt('slow_adapter_controlnet_mask')}", "--disc_blocks=1"],
        "attention.py": [],
    }[script]


def test_the_course_has_the_labs_in_the_papers_order_each_whole():
    titles = [title.lower() for _, title, _ in LABS]
    assert [int(n) for n, _, _ in LABS] == list(range(1, len(LABS) + 1)) and len(LABS) >= 6
    order = ["sprite world", "flow matching", "adapter", "dmd", "hybrid", "flashbench", "triton"]
    assert [next(i for i, t in enumerate(titles) if word in t) for word in order] == sorted(range(len(order)))
    answers = COURSE.split("## Answers")[1]
    for n, title, body in LABS:
        assert all(part in body for part in PARTS), (title, [p for p in PARTS if p not in body])
        assert re.search(r"!\[[^\]]*\]\(([\w./-]+\.(png|gif))\)", body), f"lab {n} shows no picture"
        for picture in re.findall(r"\]\(([\w./-]+\.(?:png|gif))\)", body):
            assert os.path.exists(os.path.join("docs", picture)), picture
        assert re.search(r"\d+(\.\d+)? (s|min)\b", body), f"lab {n} states no measured time"
        assert f"**Lab {n}.**" in answers, f"lab {n} has no answer"


@pytest.fixture
def course_folder(micro_folder):
    """The micro checkpoints, with a stage-3 adapter of the micro fast generator (flashmotion's)."""
    import common
    slow_adapter = common.load_checkpoint(micro_folder / "slow_adapter_controlnet_mask_micro.pt")
    common.save_checkpoint(micro_folder / "fast_adapter_hybrid_controlnet_mask_micro.pt",
                           slow_adapter | {"kind": "fast_adapter", "parent": "fast-run", "parent_path": "fast.pt"})
    return micro_folder


@pytest.mark.parametrize("n, title, body", LABS, ids=[f"lab{n}" for n, _, _ in LABS])
def test_each_lab_command_runs_at_micro_size(n, title, body, course_folder):
    words = shlex.split(command_of(body))
    env = dict(os.environ)
    while "=" in words[0]:  # leading VAR=value assignments
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[0] == "python" and len(words) <= 5, "a lab's command is a script and a few flags"
    script, flags = words[1], words[2:]
    out = course_folder / f"lab{n}"
    result = subprocess.run([sys.executable, script, *flags, *micro_flags(script, course_folder, out)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    if script not in ("sample.py", "bench.py", "attention.py"):  # a training run: its checkpoint and curves
        assert (out / "ckpt.pt").exists() and (out / "curves.png").exists()
