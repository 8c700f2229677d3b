import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import common
from adapter import Controlled, build_adapter
from hybrid_finetune import (DISC_MAX_T, LOSSES, DiffusionDiscriminator, adapter_update, adversarial_loss,
                             diffusion_loss, disc_time, discriminator_loss, loss_weights)
from model import config_dict, fast_times, few_step_sample, few_step_step
from test_adapter import adapter_checkpoint, generator_checkpoint, micro_batch, micro_generator


def trained_looking_adapter(generator, seed=0, condition="box"):
    """A ControlNet adapter whose zero-initialised layers have moved, as after stage 1."""
    torch.manual_seed(seed)
    adapter = build_adapter("controlnet", generator, condition)
    torch.nn.init.normal_(adapter.trajectory_embed.weight, std=0.05)
    for layer in adapter.outputs:
        torch.nn.init.normal_(layer.weight, std=0.05)
    return adapter


def discriminator(seed=0):
    return DiffusionDiscriminator(micro_generator(seed), [0, 1])


def test_discriminator_separates_real_from_clearly_fake_clips():
    disc = discriminator()
    batch = micro_batch(batch_size=4)
    real = batch["video"]
    fake = torch.rand_like(real) * 2 - 1  # noise clips with the right first frame
    fake[:, 0] = real[:, 0]
    cond = dict(first_frame=real[:, 0], trajectory=batch["box_maps"])
    optimizer = torch.optim.Adam(disc.classifier.parameters(), lr=3e-3)
    rng = torch.Generator().manual_seed(0)
    t = torch.full((4,), 0.3)
    for _ in range(60):
        noise = torch.randn(real.shape, generator=rng)
        loss = discriminator_loss(disc(real, t, noise, cond), disc(fake, t, noise, cond))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    noise = torch.randn(real.shape, generator=rng)  # fresh noise: it must have learnt the clips
    with torch.no_grad():
        assert torch.all(disc(real, t, noise, cond) > 0) and torch.all(disc(fake, t, noise, cond) < 0)
    assert all(p.grad is None for p in disc.backbone.parameters())


def test_query_discriminator_reads_the_trajectory():
    """The paper's classifier sees the trajectory tokens: the same clip scores
    differently under other boxes, and only the classifier gets a gradient."""
    disc = discriminator()
    batch = micro_batch()
    clip, t, noise = batch["video"], torch.full((2,), 0.3), torch.randn(batch["video"].shape)
    logits = disc(clip, t, noise, dict(first_frame=clip[:, 0], trajectory=batch["box_maps"]))
    moved = disc(clip, t, noise, dict(first_frame=clip[:, 0], trajectory=batch["box_maps"].roll(3, dims=-1)))
    assert logits.shape == (2,) and not torch.allclose(logits, moved)
    logits.sum().backward()
    assert all(p.grad is not None for p in disc.classifier.parameters())
    assert all(p.grad is None for p in disc.backbone.parameters())


def test_lambda_schedule_hands_over_from_diffusion_to_adversarial():
    """The paper's 1 / (4e-3 step + 0.1) over 1K steps, stretched to the run."""
    weights = lambda loss, step, max_steps, rate=4.0: loss_weights(
        SimpleNamespace(loss=loss, max_steps=max_steps, lambda_rate=rate), step)
    lam = lambda step, max_steps: weights("hybrid", step, max_steps)[1]
    for max_steps in (300, 1000):
        assert lam(0, max_steps) == pytest.approx(10.0)
        assert lam(0.225 * max_steps, max_steps) == pytest.approx(1.0)
        assert lam(max_steps, max_steps) == pytest.approx(1 / 4.1)
    assert lam(100, 1000) == pytest.approx(1 / (4e-3 * 100 + 0.1))
    # The ablations: other weights of the same equation, (adversarial weight, lambda).
    assert [weights(loss, 50, 300) for loss in ("fixed_lambda", "diffusion", "adversarial")] == \
        [(1.0, 1.0), (0.0, 1.0), (1.0, 0.0)]
    assert weights("hybrid", 0.0225 * 300, 300, rate=40.0)[1] == pytest.approx(1.0)  # --lambda_rate: ten times faster


def test_adversarial_gradient_reaches_the_adapter_and_only_it():
    fast = micro_generator(seed=2)
    adapter = trained_looking_adapter(fast)
    model = Controlled(fast, adapter)
    disc = discriminator()
    batch = micro_batch()
    cond = dict(first_frame=batch["video"][:, 0], trajectory=batch["box_maps"])
    times = fast_times(3.0)
    rng = torch.Generator().manual_seed(0)
    x_k = few_step_sample(model, torch.randn(batch["video"].shape, generator=rng), times, cond, rng, stop_after=2)
    generated = few_step_step(model, x_k.detach(), times[2], cond)
    loss = F.softplus(-disc(generated, torch.full((2,), 0.5), torch.randn_like(generated), cond)).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert all(p.grad is None for p in fast.parameters())
    assert all(p.grad is None for p in disc.backbone.parameters())


def stage3_inputs(folder):
    """Micro slow generator, fast generator and slow adapter checkpoints in `folder`:
    (the script's path flags, the slow adapter)."""
    slow = micro_generator()
    generator_checkpoint(folder / "slow.pt", slow, "slow-run")
    common.save_checkpoint(folder / "fast.pt", {
        "kind": "fast_generator", "run_id": "fast-run", "time_shift": 3.0, "parent": "slow-run", "parent_path": "slow.pt",
        "model_config": config_dict(slow), "ema": micro_generator(seed=3).state_dict()})
    adapter = trained_looking_adapter(slow)
    adapter_checkpoint(folder / "adapter.pt", adapter, slow, "slow-run")
    return [f"--slow_generator_ckpt={folder / 'slow.pt'}", f"--fast_generator_ckpt={folder / 'fast.pt'}",
            f"--adapter_ckpt={folder / 'adapter.pt'}"], adapter


MICRO_STAGE3 = ["--config=micro", "--batch_size=2", "--num_workers=0", "--eval_scenes=2", "--disc_blocks=0,1"]


def test_finetune_script_runs_every_loss_and_refuses_mismatches(tmp_path):
    paths, adapter = stage3_inputs(tmp_path)
    run = lambda *args: subprocess.run([sys.executable, "hybrid_finetune.py", *MICRO_STAGE3, *args],
                                       capture_output=True, text=True)
    for loss in LOSSES:
        out = tmp_path / loss
        result = run(*paths, f"--loss={loss}", "--max_steps=2", "--sample_interval=2", f"--out_dir={out}")
        assert result.returncode == 0, result.stderr[-2000:]
        ckpt = common.load_checkpoint(out / "ckpt.pt", kind="fast_adapter")
        assert ckpt["parent"] == "fast-run" and ckpt["loss"] == loss and ckpt["step"] == 2
        moved = any(not torch.equal(ckpt["model"][k], adapter.state_dict()[k]) for k in ckpt["model"])
        assert moved, loss
        assert "held-out mIoU" in result.stdout + result.stderr
        log = [json.loads(line) for line in open(out / "log.jsonl")]
        assert all(("diffusion" in r) == (loss != "adversarial") and ("disc" in r) == (loss != "diffusion")
                   for r in log), (loss, log)
    log = [json.loads(line) for line in open(tmp_path / "hybrid" / "log.jsonl")]
    assert [r["lambda"] for r in log] == [10.0, round(1 / 2.1, 4)]  # the schedule over a 2-step run
    assert all(0 <= r["d_accuracy"] <= 1 for r in log) and "finetuned" in log[-1]["held_out"]
    bad = run(*paths, "--loss=diffusion", "--max_steps=3", f"--out_dir={tmp_path / 'hybrid'}", "--resume=true")
    assert bad.returncode == 1 and "'hybrid' adapter" in bad.stderr and "Traceback" not in bad.stderr
    bad = run(*paths[:2], f"--adapter_ckpt={tmp_path / 'fast.pt'}", f"--out_dir={tmp_path / 'bad'}")
    assert bad.returncode == 1 and "expected 'slow_adapter'" in bad.stderr and "Traceback" not in bad.stderr
    for flag in ("--disc_blocks=0,9", "--disc_blocks=late", "--loss=gan", "--adv_steps=4", "--disc_noise=high",
                 "--max_free=-1"):
        bad = run(*paths, flag, f"--out_dir={tmp_path / 'bad'}")
        assert bad.returncode == 1 and flag.split("=")[0] in bad.stderr and not (tmp_path / "bad").exists()


def test_the_gan_judges_only_the_chosen_steps_at_the_chosen_noise(tmp_path):
    paths, _ = stage3_inputs(tmp_path)
    result = subprocess.run([sys.executable, "hybrid_finetune.py", *MICRO_STAGE3, *paths, "--max_steps=6",
                             "--adv_steps=3", "--disc_noise=dmd", "--max_free=2", "--sample_interval=0",
                             f"--out_dir={tmp_path / 'last'}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    log = [json.loads(line) for line in open(tmp_path / "last" / "log.jsonl")]
    assert all(r["k_adv"] == 3 for r in log) and len({r["k"] for r in log}) > 1  # the diffusion loss: every step
    rng = torch.Generator().manual_seed(0)
    low, dmd = disc_time(4096, rng, "cpu", "low"), disc_time(4096, rng, "cpu", "dmd")
    assert 0.02 <= low.min() and low.max() <= DISC_MAX_T
    assert 0.02 <= dmd.min() and dmd.max() <= 0.98 and (dmd > 0.9).float().mean() > 0.1  # shifted: mostly noisy


def test_the_schedule_rate_and_the_early_measurements_are_flags(tmp_path):
    paths, _ = stage3_inputs(tmp_path)
    result = subprocess.run([sys.executable, "hybrid_finetune.py", *MICRO_STAGE3, *paths, "--max_steps=4",
                             "--lambda_rate=40", "--sample_interval=0", "--eval_steps=1,2",
                             f"--out_dir={tmp_path / 'fast'}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    log = [json.loads(line) for line in open(tmp_path / "fast" / "log.jsonl")]
    assert [r["lambda"] for r in log] == [round(1 / (40 * s / 4 + 0.1), 4) for s in range(4)]
    assert ["held_out" in r for r in log] == [True, True, False, False]
    bad = subprocess.run([sys.executable, "hybrid_finetune.py", *MICRO_STAGE3, *paths, "--max_steps=4",
                          "--eval_steps=9,ten", f"--out_dir={tmp_path / 'bad'}"], capture_output=True, text=True)
    assert bad.returncode == 1 and "--eval_steps must be comma-separated whole numbers, got '9,ten'" in bad.stderr


def test_two_process_ddp_hybrid_keeps_ranks_in_sync(tmp_path):
    # Two losses, two forward/backward passes per step through the DDP-wrapped adapter:
    # the checkpoint's rank check (common.Run.save) fails if the ranks' adapters drift apart.
    paths, adapter = stage3_inputs(tmp_path)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "hybrid_finetune.py", *MICRO_STAGE3, *paths, "--max_steps=2", "--sample_interval=0",
                             f"--out_dir={tmp_path / 'ddp'}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 rank(s)" in result.stdout
    log = [json.loads(line) for line in open(tmp_path / "ddp" / "log.jsonl")]
    assert len(log) == 2 and all("diffusion" in r or "adversarial" in r for r in log)
    ckpt = common.load_checkpoint(tmp_path / "ddp" / "ckpt.pt", kind="fast_adapter")
    assert ckpt["step"] == 2 and any(not torch.equal(ckpt["model"][k], adapter.state_dict()[k]) for k in ckpt["model"])


def test_one_backward_of_the_equation_gives_lambda_diffusion_plus_balanced_adversarial():
    """adapter_update's gradient is lambda * grad(diffusion) + s * grad(adversarial), each
    gradient taken apart here on the same noise; balance makes s * |grad(adversarial)| =
    |grad(diffusion)|, and the classifier is left untouched."""
    fast = micro_generator(seed=2)
    adapter = trained_looking_adapter(fast)
    model, disc = Controlled(fast, adapter), discriminator()
    batch = micro_batch()
    video, cond, times = batch["video"], dict(first_frame=batch["video"][:, 0], trajectory=batch["box_maps"]), \
        fast_times(3.0)
    rng = torch.Generator().manual_seed(0)
    parameters = list(adapter.parameters())
    diffusion = torch.autograd.grad(diffusion_loss(model, video, times, 1, cond, rng), parameters)
    adversarial = torch.autograd.grad(adversarial_loss(model, disc, video, times, 2, cond, rng, "low")[0], parameters)
    norm = lambda grads: torch.sqrt(sum((g ** 2).sum() for g in grads))
    for balance in (True, False):
        record = {}
        fake = adapter_update(model, adapter, disc, video, times, 1, 2, cond, (1.0, 10.0),
                              SimpleNamespace(balance=balance, disc_noise="low"), torch.Generator().manual_seed(0), record)
        scale = record["adversarial_scale"]
        assert fake.shape == video.shape and (scale == 1.0) != balance
        if balance:
            assert scale * norm(adversarial) == pytest.approx(norm(diffusion).item(), rel=1e-4)
        for p, d, a in zip(parameters, diffusion, adversarial):
            expected = 10 * d + scale * a
            torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
        assert all(p.grad is None for p in disc.classifier.parameters())
        adapter.zero_grad(set_to_none=True)
    record = {}  # an ablation's zero weight: its term is not computed
    assert adapter_update(model, adapter, disc, video, times, 1, 2, cond, (0.0, 1.0),
                          SimpleNamespace(balance=True, disc_noise="low"), rng, record) is None
    assert "adversarial" not in record and record["adversarial_scale"] == 1.0
