import json
import subprocess
import sys

import torch

import common
from adapter import Controlled, build_adapter
from hybrid_finetune import DiffusionDiscriminator, LOSSES, discriminator_loss, generator_adversarial_loss
from model import config_dict, fast_times, few_step_sample, few_step_step
from test_adapter import adapter_checkpoint, generator_checkpoint, micro_batch, micro_generator


def trained_looking_adapter(generator, seed=0):
    """A ControlNet adapter whose zero-initialised layers have moved, as after stage 1."""
    torch.manual_seed(seed)
    adapter = build_adapter("controlnet", generator)
    torch.nn.init.normal_(adapter.trajectory_embed.weight, std=0.05)
    for layer in adapter.outputs:
        torch.nn.init.normal_(layer.weight, std=0.05)
    return adapter


def discriminator(seed=0):
    slow = micro_generator(seed)
    return DiffusionDiscriminator(Controlled(slow, trained_looking_adapter(slow).requires_grad_(False)), [0, 1])


def test_discriminator_separates_real_from_clearly_fake_clips():
    disc = discriminator()
    batch = micro_batch(batch_size=4)
    real = batch["video"]
    fake = torch.rand_like(real) * 2 - 1  # noise clips with the right first frame
    fake[:, 0] = real[:, 0]
    cond = dict(first_frame=real[:, 0], trajectory=batch["box_maps"])
    optimizer = torch.optim.Adam(disc.heads.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    t = torch.full((4,), 0.3)
    for _ in range(60):
        noise = torch.randn(real.shape, generator=generator)
        loss = discriminator_loss(disc(real, t, noise, cond), disc(fake, t, noise, cond))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    noise = torch.randn(real.shape, generator=generator)  # fresh noise: it must have learnt the clips
    with torch.no_grad():
        assert torch.all(disc(real, t, noise, cond) > 0) and torch.all(disc(fake, t, noise, cond) < 0)
    assert all(p.grad is None for p in disc.backbone.parameters())


def test_adversarial_gradient_reaches_the_adapter_and_only_it():
    fast = micro_generator(seed=2)
    adapter = trained_looking_adapter(fast)
    model = Controlled(fast, adapter)
    disc = discriminator()
    batch = micro_batch()
    cond = dict(first_frame=batch["video"][:, 0], trajectory=batch["box_maps"])
    times = fast_times()
    generator = torch.Generator().manual_seed(0)
    x_k = few_step_sample(model, torch.randn(batch["video"].shape, generator=generator), times, cond,
                            generator, stop_after=2)
    generated = few_step_step(model, x_k.detach(), times[2], cond)
    loss = generator_adversarial_loss(disc(generated, torch.full((2,), 0.5), torch.randn_like(generated), cond))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())
    assert all(p.grad is None for p in fast.parameters())
    assert all(p.grad is None for p in disc.backbone.parameters())


def test_finetune_script_runs_all_three_losses_and_refuses_mismatches(tmp_path):
    slow = micro_generator()
    generator_checkpoint(tmp_path / "slow.pt", slow, "slow-run")
    common.save_checkpoint(tmp_path / "fast.pt", {
        "kind": "fast_generator", "run_id": "fast-run", "parent": "slow-run", "parent_path": "slow.pt",
        "model_config": config_dict(slow), "ema": micro_generator(seed=3).state_dict()})
    adapter = trained_looking_adapter(slow)
    adapter_checkpoint(tmp_path / "adapter.pt", adapter, slow, "slow-run")
    paths = [f"--slow_generator_ckpt={tmp_path / 'slow.pt'}", f"--fast_generator_ckpt={tmp_path / 'fast.pt'}",
             f"--adapter_ckpt={tmp_path / 'adapter.pt'}"]
    run = lambda *args: subprocess.run([sys.executable, "hybrid_finetune.py", "--config=micro", "--batch_size=2",
                                        "--num_workers=0", "--eval_scenes=2", "--disc_blocks=0,1", *args],
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
    result = run(*paths, "--loss=diffusion", "--diffusion_steps=3", "--max_steps=3", "--sample_interval=0",
                 f"--out_dir={tmp_path / 'late'}")
    assert result.returncode == 0, result.stderr[-2000:]
    log = [json.loads(line) for line in open(tmp_path / "late" / "log.jsonl")]
    assert [r["k"] for r in log] == [3, 3, 3] and all("diffusion" in r for r in log)
    bad = run(*paths[:2], f"--adapter_ckpt={tmp_path / 'fast.pt'}", f"--out_dir={tmp_path / 'bad'}")
    assert bad.returncode == 1 and "expected 'slow_adapter'" in bad.stderr and "Traceback" not in bad.stderr
    bad = run(*paths, "--disc_blocks=0,9", f"--out_dir={tmp_path / 'bad'}")
    assert bad.returncode == 1 and "--disc_blocks" in bad.stderr
    for flag in ("--disc_max_t=0", "--diffusion_steps=1,5", "--diffusion_steps=late"):
        bad = run(*paths, flag, f"--out_dir={tmp_path / 'bad'}")
        assert bad.returncode == 1 and flag.split("=")[0] in bad.stderr and not (tmp_path / "bad").exists()
