import json
import subprocess
import sys

import torch
import torch.nn as nn

import common
import data
import sample
from adapter import Controlled
from consistency import consistency_loss
from model import few_step_step, sampling_times
from test_adapter import micro_batch, micro_generator
from test_bench import micro_checkpoints
from test_hybrid import trained_looking_adapter


class LinearVelocity(nn.Module):
    """v(x, t) = a x + b t + c (1 with a trajectory, 0 without): a model whose every prediction is known."""

    def __init__(self, a, b, c=0.0):
        super().__init__()
        self.a, self.b, self.c = nn.Parameter(torch.tensor(a)), nn.Parameter(torch.tensor(b)), c

    def forward(self, x, t, first_frame, traj_keep=None, trajectory=None):
        kept = 0.0 if traj_keep is not None else 1.0
        return self.a * x + self.b * t.view(-1, 1, 1) + self.c * kept


def test_the_loss_is_the_teacher_step_then_the_target_against_the_student():
    student, target, teacher = LinearVelocity(0.5, 1.0), LinearVelocity(0.2, -1.0), LinearVelocity(0.1, 0.3, c=2.0)
    x0, grid, guidance = torch.randn(3, 4, 5), sampling_times(6), 3.0
    cond, uncond = dict(first_frame=None, trajectory=True), {"traj_keep": 0}
    rng = torch.Generator().manual_seed(7)
    loss = consistency_loss(student, target, teacher, x0, cond, uncond, grid, guidance, rng)
    rng = torch.Generator().manual_seed(7)  # the same draws, by hand
    index = torch.randint(len(grid) - 1, (3,), generator=rng)
    t, s = grid[index].view(-1, 1, 1), grid[index + 1].view(-1, 1, 1)
    noise = torch.randn(x0.shape, generator=rng)
    x_t = (1 - t) * x0 + t * noise
    guided = 0.1 * x_t + 0.3 * t + guidance * 2.0  # uncond + w (cond - uncond): the trajectory's term times w
    x_s = x_t + (s - t) * guided
    expected = ((x_t - t * (0.5 * x_t + t)) - (x_s - s * (0.2 * x_s - s))).pow(2).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert student.a.grad is not None and target.a.grad is None and teacher.a.grad is None  # the target has none


def test_the_consistency_function_is_the_identity_at_time_zero():
    # f(x, t) = x - t v(x, t): at the grid's end the target is the teacher's step itself (the boundary condition).
    x = torch.randn(2, 4, 3, 16, 16)
    torch.testing.assert_close(few_step_step(micro_generator(), x, torch.zeros(2), {"first_frame": x[:, 0]}), x)


def test_the_loss_falls_on_a_fixed_batch_with_a_fixed_target():
    slow = micro_generator()
    teacher = Controlled(slow, trained_looking_adapter(slow, condition="mask"))
    student = Controlled(micro_generator(seed=2), trained_looking_adapter(slow, condition="mask")).requires_grad_(True)
    batch = data.SpriteWorld(4, 16, batch_size=4, seed=0).batch(0)
    x0 = batch["video"]
    cond = dict(first_frame=x0[:, 0], trajectory=batch["mask_maps"])
    uncond = {"traj_keep": torch.zeros(4)}
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = consistency_loss(student, teacher, teacher, x0, cond, uncond, sampling_times(8), 3.0,
                                torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def run_lcm(*args):
    return subprocess.run([sys.executable, "consistency.py", "--config=micro", "--batch_size=2", "--num_workers=0",
                           "--ckpt_interval=2", "--teacher_steps=4", *args], capture_output=True, text=True)


def test_lcm_runs_resumes_bit_exact_and_samples(tmp_path):
    micro_checkpoints(tmp_path)
    paths = [f"--teacher_ckpt={tmp_path / 'slow_generator_micro.pt'}",
             f"--adapter_ckpt={tmp_path / 'slow_adapter_controlnet_mask_micro.pt'}",
             f"--fid_encoder={tmp_path / 'video_encoder_micro.pt'}", "--eval_scenes=4"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    result = run_lcm(*paths, "--max_steps=4", "--sample_interval=4", f"--out_dir={straight}")
    assert result.returncode == 0, result.stderr[-2000:]
    log = [json.loads(line) for line in open(straight / "log.jsonl")]
    assert log[0]["step"] == 0 and log[0]["held_out"]["fid"] > 0 and 0 <= log[0]["held_out"]["miou"] <= 1
    assert log[-1]["held_out"]["fid"] > 0 and (straight / "samples" / "step_000004.gif").exists()
    assert run_lcm(*paths, "--max_steps=4", "--stop_at=2", "--sample_interval=0",
                   f"--out_dir={interrupted}").returncode == 0
    assert run_lcm(*paths, "--max_steps=4", "--sample_interval=0", "--resume=true",
                   f"--out_dir={interrupted}").returncode == 0
    a, b = common.load_checkpoint(straight / "ckpt.pt"), common.load_checkpoint(interrupted / "ckpt.pt")
    assert a["kind"] == "lcm_joint" and a["step"] == b["step"] == 4 and a["adapter_parent"] == "adapter-run"
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    moved = [key for key in a["model"] if key.startswith("adapter.") and not torch.equal(
        a["model"][key], common.load_checkpoint(tmp_path / "slow_adapter_controlnet_mask_micro.pt")["ema"][key[8:]])]
    assert moved  # generator and adapter are distilled together
    common.export_checkpoint(straight / "ckpt.pt", tmp_path / "lcm_joint_mask_micro.pt")
    method = sample.load_method("lcm", "micro", folder=str(tmp_path))
    assert method.sampler == "few-step" and method.controlled and method.shift == 3.0
    scenes = micro_batch()
    clips, _ = sample.generate_clips(method, scenes)
    assert clips.shape == scenes["video"].shape and clips.abs().max() <= 1


def test_bad_lcm_flags_are_one_line(tmp_path):
    for flag, name in (("--target_decay=1", "--target_decay"), ("--teacher_steps=1", "--teacher_steps")):
        result = run_lcm(flag, f"--out_dir={tmp_path}")
        assert result.returncode == 1 and name in result.stderr and "Traceback" not in result.stderr


def test_two_process_ddp_lcm_keeps_ranks_in_sync(tmp_path):
    # The student is DDP-wrapped; teacher and target are not: the checkpoint's rank check
    # (common.Run.save) fails if the ranks' students drift apart.
    micro_checkpoints(tmp_path)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "consistency.py", "--config=micro", "--batch_size=2", "--num_workers=0",
                             "--teacher_steps=4", "--max_steps=2", "--sample_interval=0",
                             f"--teacher_ckpt={tmp_path / 'slow_generator_micro.pt'}",
                             f"--adapter_ckpt={tmp_path / 'slow_adapter_controlnet_mask_micro.pt'}",
                             f"--out_dir={tmp_path / 'ddp'}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 rank(s)" in result.stdout
    assert common.load_checkpoint(tmp_path / "ddp" / "ckpt.pt", kind="lcm_joint")["step"] == 2
