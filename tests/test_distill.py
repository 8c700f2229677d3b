import json
import subprocess
import sys

import torch

import common
from distill import dmd_loss
from model import fast_generate, fast_times, few_step_sample, few_step_step, flow_matching_loss
from test_adapter import adapter_checkpoint, generator_checkpoint, micro_batch, micro_generator
from test_bench import encoder_checkpoint


def test_dmd_gradient_is_fake_minus_real_over_the_normaliser():
    torch.manual_seed(0)
    generated = torch.randn(3, 4, 3, 8, 8, requires_grad=True)
    fake, real = torch.randn(3, 4, 3, 8, 8), torch.randn(3, 4, 3, 8, 8)
    dmd_loss(generated, fake, real).backward()
    normaliser = (generated.detach() - real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    expected = (fake - real) / normaliser / generated.numel()
    torch.testing.assert_close(generated.grad, expected)
    # A generator already where the teacher is (fake == real) gets no push.
    generated.grad = None
    dmd_loss(generated, real, real).backward()
    assert torch.count_nonzero(generated.grad) == 0


def test_training_inputs_come_from_the_sampling_path():
    # Backward simulation: stopping the sampler after k steps and taking step
    # k by hand gives exactly the clip the sampler itself makes.
    generator = micro_generator()
    first = micro_batch()["video"][:, 0]
    times = fast_times(3.0)
    assert len(times) == 4 and times[0] == 1 and torch.all(times[1:] < times[:-1])
    full = fast_generate(generator, first, 3.0, torch.Generator().manual_seed(3))
    rng = torch.Generator().manual_seed(3)
    noise = torch.randn(2, 4, 3, 16, 16, generator=rng)
    x_k = few_step_sample(generator, noise, times, {"first_frame": first}, rng, stop_after=3)
    with torch.no_grad():
        last = few_step_step(generator, x_k, times[3], {"first_frame": first})
    torch.testing.assert_close(last.clamp(-1, 1), full)
    torch.testing.assert_close(full[:, 0], first)  # the first frame is kept


def test_fake_score_fits_the_generator_outputs():
    generator = micro_generator()
    fake = micro_generator(seed=1).requires_grad_(True)
    first = micro_batch(batch_size=4)["video"][:, 0]
    clips = fast_generate(generator, first, 3.0, torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(fake.parameters(), lr=2e-3)
    noise, t = torch.randn_like(clips), torch.rand(4) * 0.8 + 0.1
    losses = []
    for _ in range(100):
        loss = flow_matching_loss(fake, clips, first, t=t, noise=noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def run_distill(*args):
    return subprocess.run([sys.executable, "distill.py", "--config=micro", "--batch_size=2", "--num_workers=0",
                           "--ckpt_interval=2", "--ratio=2", *args], capture_output=True, text=True)


def test_distillation_iterations_run_and_resume(tmp_path):
    generator_checkpoint(tmp_path / "gen.pt", micro_generator(), "run-a")
    teacher = f"--teacher_ckpt={tmp_path / 'gen.pt'}"
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    encoder_checkpoint(tmp_path / "encoder.pt")  # the held-out FID's network, micro-sized
    result = run_distill(teacher, "--max_steps=4", "--sample_interval=4", f"--fid_encoder={tmp_path / 'encoder.pt'}",
                         f"--out_dir={straight}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (straight / "samples" / "step_000004.gif").exists() and "held-out FID" in result.stdout + result.stderr
    log = [json.loads(line) for line in open(straight / "log.jsonl")]
    assert log[0]["step"] == 0 and log[0]["held_out"]["fid"] > 0  # the student before DMD: lab 4's iteration 0
    assert log[-1]["held_out"]["fid"] > 0 and all("held_out" not in r for r in log[1:-1])
    assert run_distill(teacher, "--max_steps=4", "--stop_at=2", "--sample_interval=0",
                       f"--out_dir={interrupted}").returncode == 0
    assert run_distill(teacher, "--max_steps=4", "--sample_interval=0", "--resume=true",
                       f"--out_dir={interrupted}").returncode == 0
    a, b = common.load_checkpoint(straight / "ckpt.pt"), common.load_checkpoint(interrupted / "ckpt.pt")
    assert a["kind"] == "fast_generator" and a["parent"] == "run-a" and a["step"] == b["step"] == 4
    teacher_weights = common.load_checkpoint(tmp_path / "gen.pt")["ema"]
    assert any(not torch.equal(a["model"][k], teacher_weights[k]) for k in teacher_weights)  # G moved
    for part in ("model", "fake_score"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


def test_the_fast_shift_is_saved_and_every_4_step_sampler_reads_it(tmp_path):
    import sample
    slow = micro_generator()
    generator_checkpoint(tmp_path / "slow_generator_micro.pt", slow, "run-a")
    result = run_distill(f"--teacher_ckpt={tmp_path / 'slow_generator_micro.pt'}", "--fast_shift=5", "--max_steps=2",
                         "--sample_interval=0", f"--out_dir={tmp_path / 'fast'}")
    assert result.returncode == 0, result.stderr[-2000:]
    common.export_checkpoint(tmp_path / "fast" / "ckpt.pt", tmp_path / "fast_generator_micro.pt")
    assert common.load_checkpoint(tmp_path / "fast_generator_micro.pt")["time_shift"] == 5.0
    method = sample.load_method("fast-generator", "micro", folder=str(tmp_path))
    assert method.shift == 5.0 and fast_times(5.0)[1] > fast_times(3.0)[1]  # shift 5 spends more steps at high noise
    first = micro_batch()["video"][:, 0]
    clip, _ = sample.generate_clips(method, {"video": first[:, None]})
    torch.testing.assert_close(clip, fast_generate(method.model, first, 5.0, torch.Generator().manual_seed(0)))


def test_bad_time_range_is_refused(tmp_path):
    result = run_distill("--t_min=0.5", "--t_max=0.2", f"--out_dir={tmp_path}")
    assert result.returncode == 1 and "--t_min" in result.stderr and "Traceback" not in result.stderr


def test_controlled_mode_distils_generator_and_adapter_together(tmp_path):
    from test_hybrid import trained_looking_adapter
    slow = micro_generator()
    generator_checkpoint(tmp_path / "slow.pt", slow, "slow-run")
    adapter = trained_looking_adapter(slow)
    adapter_checkpoint(tmp_path / "adapter.pt", adapter, slow, "slow-run")
    result = run_distill(f"--teacher_ckpt={tmp_path / 'slow.pt'}", "--controlled=true",
                         f"--adapter_ckpt={tmp_path / 'adapter.pt'}", "--max_steps=4", "--sample_interval=4",
                         f"--out_dir={tmp_path / 'joint'}")
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = common.load_checkpoint(tmp_path / "joint" / "ckpt.pt", kind="dmd_joint")
    assert ckpt["adapter_parent"] == "adapter-run" and ckpt["adapter_config"] == adapter.config()
    moved = [k for k, v in ckpt["model"].items() if k.startswith("adapter.")
             and not torch.equal(v, adapter.state_dict()[k[len("adapter."):]])]
    # (the first generator update is a no-op: fake == real until the fake score has moved)
    assert moved  # the adapter is distilled too, not only the generator
