"""Stage 2: DMD distillation of the slow generator into a 4-step fast generator.

Distribution Matching Distillation in the DMD2 form that video distillers
use (CausVid, Self-Forcing). Three networks:

  fast generator  G, initialised from the slow generator, makes a clip in 4
                  steps: predict the clean clip, re-noise it to the next
                  time of FAST_TIMES with fresh noise, repeat;
  real score      the frozen slow generator with classifier-free guidance:
                  where the data distribution pulls;
  fake score      a trainable copy, fitted with the flow-matching loss to
                  G's own outputs: where G's distribution currently is.

G's clip moves along (fake - real): away from its own distribution and
towards the teacher's. The fake score is updated every iteration, G every
`ratio` iterations (the two time-scale rule), so the fake score keeps up.

    python distill.py                                  # tiny, on checkpoints/slow_generator_tiny.pt
    python distill.py --controlled=true                # the dmd-joint baseline: generator + adapter together
    torchrun --nproc_per_node=4 distill.py --config=small --teacher_ckpt=runs/slow_generator_small/ckpt.pt
    python distill.py --resume=true
"""

import copy
import json
import os
import sys
import time
import uuid
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

import adapter as A
import data
import model as M
from common import (UserError, apply_overrides, autocast, check_ranks_in_sync, cleanup_distributed, ema_update,
                    load_checkpoint, lr_at, noise_seed, open_log, refuse_overwrite, require_at_least,
                    save_checkpoint, setup_distributed)

# The 4-step list, before the timestep shift: t = 1, 0.75, 0.5, 0.25 become
# 1, 0.9, 0.75, 0.5 with shift 3 (most of the work is at high noise).
FAST_TIMES = (1.0, 0.75, 0.5, 0.25)


def fast_times(shift=M.TIME_SHIFT, device="cpu"):
    return M.shift_time(torch.tensor(FAST_TIMES, device=device), shift)


def few_step_step(model, x, t, conditions):
    """One step of the few-step sampler: the clean clip the model predicts at time t."""
    t = t.expand(x.shape[0])
    return M.clean_estimate(x, model(x, t, **conditions), t)


def few_step_sample(model, noise, times, conditions, generator=None, stop_after=None):
    """The fast generator's sampler (DMD2): at each time predict the clean
    clip, then re-noise it to the next time with fresh noise. stop_after=k
    returns after k steps the noisy clip at times[k], the input of step k
    (backward simulation: training inputs come from the generator itself)."""
    x = noise
    for k, t in enumerate(times):
        if k == stop_after:
            return x
        x0 = few_step_step(model, x, t, conditions)
        if k + 1 < len(times):
            fresh = torch.randn(x.shape, generator=generator, device=x.device)
            x = M.add_noise(x0, fresh, times[k + 1].expand(x.shape[0]))
    return x0


@torch.no_grad()
def fast_generate(model, first_frame, generator=None, shift=M.TIME_SHIFT, **conditions):
    """A clip in len(FAST_TIMES) steps: (B, T, C, H, W) in [-1, 1]."""
    cfg = model.cfg
    noise = torch.randn((first_frame.shape[0], cfg.frames, cfg.channels, cfg.size, cfg.size),
                        generator=generator, device=first_frame.device)
    times = fast_times(shift, first_frame.device)
    return few_step_sample(model, noise, times, dict(first_frame=first_frame, **conditions), generator).clamp(-1, 1)


def dmd_loss(generated, fake_x0, real_x0):
    """The distribution-matching loss of one batch of generated clips.

    generated (B, ...) has a gradient path to G; fake_x0 and real_x0 are the
    two scores' clean estimates of the same re-noised clips, without one.
    The KL gradient between G's and the data distribution is (fake - real)
    (DMD, Yin et al. 2024). It is divided per sample by the mean distance
    between the clip and the real score's estimate, so its size does not
    depend on how far G is (DMD's normaliser), and written as an MSE to a
    stop-gradient target, whose gradient w.r.t. `generated` is exactly that
    direction (divided by the element count, as any mean loss is)."""
    dims = tuple(range(1, generated.dim()))
    with torch.no_grad():
        generated_d, fake_d, real_d = generated.double(), fake_x0.double(), real_x0.double()
        normaliser = (generated_d - real_d).abs().mean(dim=dims, keepdim=True)   # per sample
        direction = torch.nan_to_num((fake_d - real_d) / normaliser)            # move away from fake
        target = (generated_d - direction).float()                              # one step along it
    return 0.5 * F.mse_loss(generated.float(), target)


def main(argv):
    # ------------------------------------------------------------ config ----
    opt = SimpleNamespace(**apply_overrides(dict(
        config="tiny",
        teacher_ckpt="",           # default: checkpoints/slow_generator_<config>.pt
        controlled=False,          # dmd-joint: distil generator + slow adapter together
        adapter_ckpt="",           # with --controlled: default checkpoints/slow_adapter_controlnet_<config>.pt
        out_dir="",                # default: runs/fast_generator_<config> (runs/dmd_joint_<config>)
        batch_size=8,
        max_steps=1200,            # iterations; one fake-score update each
        stop_at=0,
        ratio=5,                   # fake-score updates per generator update (two time-scale rule)
        lr_generator=2e-5,
        lr_fake=1e-4,
        warmup=50,
        grad_clip=1.0,
        ema_decay=0.99,
        guidance=1.0,              # real score CFG, `uncond + w (cond - uncond)`; on the first frame, or the trajectory
        t_min=0.02,                # DMD re-noises at shifted uniform t clamped to [t_min, t_max]
        t_max=0.98,
        ckpt_interval=50,
        sample_interval=300,       # a GIF of held-out scenes every this many iterations (0: never)
        num_workers=1,
        seed=0,
        compile=torch.cuda.is_available(),
        resume=False,
    ), argv))
    # ------------------------------------------------------------------------
    if opt.config not in data.CONFIGS:
        raise UserError(f"--config must be one of {', '.join(data.CONFIGS)}")
    require_at_least(opt, ("batch_size", "max_steps", "ratio", "ckpt_interval"))
    if not 0 < opt.t_min < opt.t_max < 1:
        raise UserError("need 0 < --t_min < --t_max < 1")
    opt.teacher_ckpt = opt.teacher_ckpt or f"checkpoints/slow_generator_{opt.config}.pt"
    opt.adapter_ckpt = opt.adapter_ckpt or (f"checkpoints/slow_adapter_controlnet_{opt.config}.pt"
                                            if opt.controlled else "")
    kind = "dmd_joint" if opt.controlled else "fast_generator"
    opt.out_dir = opt.out_dir or f"runs/{kind}_{opt.config}"
    ckpt_path = os.path.join(opt.out_dir, "ckpt.pt")
    refuse_overwrite(ckpt_path, opt.resume)

    rank, world_size, device = setup_distributed()
    master = rank == 0
    torch.manual_seed(opt.seed)

    # ------------------------------------------- setup: the three networks ---
    teacher = load_checkpoint(opt.teacher_ckpt, kind="slow_generator")
    slow_generator = M.model_from_checkpoint(teacher).to(device).requires_grad_(False).eval()
    if M.config_dict(slow_generator) != M.config_dict(M.build_model(opt.config)):
        raise UserError(f"{opt.teacher_ckpt} is not a '{opt.config}' generator")
    if opt.controlled:  # the teacher is the controllable pair; all three networks carry an adapter
        adapter_ckpt = load_checkpoint(opt.adapter_ckpt, kind="slow_adapter")
        slow_adapter = A.adapter_from_checkpoint(adapter_ckpt, slow_generator, teacher).to(device)
        real_score = A.Controlled(slow_generator, slow_adapter.requires_grad_(False))
    else:
        adapter_ckpt = None
        real_score = slow_generator

    def trainable_copy():
        return copy.deepcopy(real_score).requires_grad_(True).train()

    fast_generator, fake_score = trainable_copy(), trainable_copy()
    ema_generator = copy.deepcopy(fast_generator).requires_grad_(False).eval()
    opt_generator = torch.optim.AdamW(fast_generator.parameters(), lr=opt.lr_generator, betas=(0.0, 0.999),
                                      weight_decay=0.0)
    opt_fake = torch.optim.AdamW(fake_score.parameters(), lr=opt.lr_fake, betas=(0.0, 0.999), weight_decay=0.0)
    step, run_id = 0, uuid.uuid4().hex[:12]
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, kind=kind, map_location=device)
        if ckpt["parent"] != teacher["run_id"]:
            raise UserError(f"{ckpt_path} distils generator run {ckpt['parent']}, not {teacher['run_id']}")
        for module, key in ((fast_generator, "model"), (ema_generator, "ema"), (fake_score, "fake_score"),
                            (opt_generator, "opt_generator"), (opt_fake, "opt_fake")):
            module.load_state_dict(ckpt[key])
        step, run_id = ckpt["step"], ckpt["run_id"]
        del ckpt
    if master:
        n = sum(p.numel() for p in fast_generator.parameters()) / 1e6
        print(f"DMD {'(controlled: dmd-joint) ' if opt.controlled else ''}of {opt.teacher_ckpt}: generator and "
              f"fake score {n:.2f}M parameters each, 4 steps at t = "
              f"{[round(t, 3) for t in fast_times().tolist()]}, guidance {opt.guidance}, device {device}, "
              f"{world_size} rank(s), iteration {step}/{opt.max_steps}")

    def wrap(module):
        module = torch.compile(module) if opt.compile else module
        return DDP(module, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else module

    train_generator, train_fake = wrap(fast_generator), wrap(fake_score)
    times = fast_times(device=device)

    shape = data.CONFIGS[opt.config]
    stream = data.SpriteWorld(**shape, batch_size=opt.batch_size, seed=opt.seed, rank=rank, start=step)
    batches = iter(DataLoader(stream, batch_size=None, num_workers=opt.num_workers,
                              persistent_workers=opt.num_workers > 0))
    noise_gen = torch.Generator(device=device)

    def conditions_of(batch):
        first = batch["video"][:, 0].to(device)
        if not opt.controlled:
            return dict(first_frame=first), {"first_frame": None}
        zeros = torch.zeros(len(first), device=device)
        return dict(first_frame=first, trajectory=batch["box_maps"].to(device)), {"traj_keep": zeros}

    def save():
        check_ranks_in_sync(fast_generator)
        if master:
            save_checkpoint(ckpt_path, {
                "kind": kind, "run_id": run_id, "parent": teacher["run_id"], "parent_path": opt.teacher_ckpt,
                "adapter_parent": adapter_ckpt["run_id"] if adapter_ckpt else None,
                "model_config": M.config_dict(slow_generator),
                "adapter_config": slow_adapter.config() if opt.controlled else None,
                "fast_times": FAST_TIMES, "time_shift": M.TIME_SHIFT, "step": step, "train_config": vars(opt),
                "model": fast_generator.state_dict(), "ema": ema_generator.state_dict(),
                "fake_score": fake_score.state_dict(), "opt_generator": opt_generator.state_dict(),
                "opt_fake": opt_fake.state_dict(),
            })

    def write_samples():
        """Held-out scenes: truth | teacher, 50 steps | teacher, 4 steps | fast generator (EMA), 4 steps."""
        scenes = data.SpriteWorld(**shape, batch_size=4, seed=data.HELD_OUT_SEED).batch(0)
        cond, _ = conditions_of(scenes)
        seed = lambda: torch.Generator(device=device).manual_seed(0)
        extra = {k: v for k, v in cond.items() if k != "first_frame"}
        with autocast(device):
            clips = [scenes["video"],
                     M.generate(real_score, cond["first_frame"], steps=50, generator=seed(), **extra),
                     M.generate(real_score, cond["first_frame"], steps=4, generator=seed(), **extra),
                     fast_generate(ema_generator, cond["first_frame"], seed(), **extra)]
        rows = [[data.to_uint8(clip[i].float().cpu()) for clip in clips] for i in range(4)]
        path = os.path.join(opt.out_dir, "samples", f"step_{step:06d}.gif")
        data.save_video(path, data.video_grid([[data.upscale(c, 4) for c in row] for row in rows]))
        return path

    # --------------------------------------------------------------- loop ---
    end_step = min(opt.stop_at or opt.max_steps, opt.max_steps)
    os.makedirs(opt.out_dir, exist_ok=True)
    log = open_log(opt.out_dir, step) if master else None
    bar = tqdm(total=end_step, initial=step, disable=not master, desc="stage 2 DMD", dynamic_ncols=True)
    last_time = time.time()
    while step < end_step:
        batch = next(batches)
        cond, uncond = conditions_of(batch)
        B = batch["video"].shape[0]
        noise_gen.manual_seed(noise_seed(opt.seed, rank, step))  # the same on every rank but for the rank key
        update_generator = step % opt.ratio == 0
        record = {"step": step + 1}

        # -- the generator's clip, by backward simulation: from pure noise,
        # run G itself (no grad) for k steps, then take step k with grad.
        # k is keyed on the iteration alone, so all ranks agree.
        k = int(torch.randint(len(times), (1,), generator=torch.Generator().manual_seed(opt.seed * 7919 + step)))
        noise = torch.randn(batch["video"].shape, generator=noise_gen, device=device)
        with torch.no_grad(), autocast(device):
            x_k = few_step_sample(fast_generator, noise, times, cond, noise_gen, stop_after=k)

        # -- generator update: the distribution-matching gradient.
        if update_generator:
            for group in opt_generator.param_groups:
                group["lr"] = lr_at(step // opt.ratio, opt.lr_generator, opt.warmup // opt.ratio,
                                    opt.max_steps // opt.ratio)
            with autocast(device):
                generated = few_step_step(train_generator, x_k, times[k], cond)  # (B, T, C, H, W), with grad
            with torch.no_grad(), autocast(device):
                t = M.sample_training_time(B, noise_gen, device).clamp(opt.t_min, opt.t_max)
                x_t = M.add_noise(generated.detach(), torch.randn(generated.shape, generator=noise_gen,
                                                                  device=device), t)
                fake_x0 = M.clean_estimate(x_t, fake_score(x_t, t, **cond), t)
                real_velocity = M.guided_velocity(real_score, opt.guidance, cond, uncond)(x_t, t)
                real_x0 = M.clean_estimate(x_t, real_velocity, t)
            loss_generator = dmd_loss(generated, fake_x0, real_x0)
            loss_generator.backward()
            record["generator_grad_norm"] = torch.nn.utils.clip_grad_norm_(fast_generator.parameters(),
                                                                           opt.grad_clip).item()
            opt_generator.step()
            opt_generator.zero_grad(set_to_none=True)
            ema_update(ema_generator, fast_generator, min(opt.ema_decay, (1 + step) / (10 + step)))
            clip = generated.detach()
        else:
            with torch.no_grad(), autocast(device):
                clip = few_step_step(fast_generator, x_k, times[k], cond)

        # -- fake score update: flow matching on the generator's clips, so
        # that it tracks the generator's current distribution.
        for group in opt_fake.param_groups:
            group["lr"] = lr_at(step, opt.lr_fake, opt.warmup, opt.max_steps)
        with autocast(device):
            loss_fake = M.flow_matching_loss(train_fake, clip.float(), cond["first_frame"], noise_gen,
                                             **{k_: v for k_, v in cond.items() if k_ != "first_frame"})
        loss_fake.backward()
        torch.nn.utils.clip_grad_norm_(fake_score.parameters(), opt.grad_clip)
        opt_fake.step()
        opt_fake.zero_grad(set_to_none=True)
        step += 1

        now = time.time()
        record.update(fake_loss=round(loss_fake.item(), 5), time=round(now, 1),
                      samples_per_s=round(B * world_size / (now - last_time), 2))
        last_time = now
        bar.update(1)
        bar.set_postfix(fake_loss=f"{loss_fake.item():.4f}",
                        g_grad=f"{record.get('generator_grad_norm', float('nan')):.3f}")
        if step % opt.ckpt_interval == 0 or step == end_step:
            save()
        if master and opt.sample_interval and (step % opt.sample_interval == 0 or step == end_step):
            bar.write(f"iteration {step}: samples in {write_samples()}")
        if master:
            log.write(json.dumps(record) + "\n")
            log.flush()
    bar.close()
    if master:
        print(f"{'done' if step == opt.max_steps else 'stopped'}: {ckpt_path} at iteration {step}/{opt.max_steps}")
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
