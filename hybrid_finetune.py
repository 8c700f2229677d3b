"""Stage 3: hybrid diffusion + adversarial finetune of the adapter on the fast generator.

The heart of FlashMotion. The slow adapter was trained on the slow
generator; plugged into the 4-step fast generator as is (the `naive`
pairing) its objects drift and blur. Here it is finetuned on the frozen fast
generator, along the same 4-step path the fast generator samples
(backward simulation, distill.py's sampler), with

  a diffusion loss     at a step k of the 4-step list, the adapted fast
                       generator's clean prediction of a noised real clip
                       (with its true trajectory maps) is regressed to that
                       clip: pixel supervision that keeps objects on their
                       paths;
  an adversarial loss  from a diffusion discriminator: the frozen slow
                       generator + slow adapter read a clip re-noised at a
                       random t, and small trainable heads on several of its
                       blocks' features tell real clips from generated ones
                       (the trajectory enters through the slow adapter):
                       what keeps the 4-step clips sharp.

  adapter loss = diffusion + lambda_adv * adversarial        (--loss=hybrid)

--loss=diffusion and --loss=adversarial train the two ablations of the paper.
The GAN loss is the non-saturating one (softplus), as in DMD2. No R1 penalty:
the discriminator only ever sees noised clips, which already smooths it
(the instance-noise argument of Diffusion-GAN), and R1 would need a second
backward through the whole backbone. The discriminator re-noises to
t ~ U(0.02, disc_max_t = 0.6), and its heads learn at lr 2e-3: with the
generator's own shifted t (mostly above 0.7) and lr 2e-4, the heads stayed
at chance for a whole run (accuracy 0.50, loss 2 ln 2), so the adversarial
loss fed the adapter noise. Measured with the heads alone on fixed clips:
above t ~ 0.75 real and generated clips are hardly told apart.

    python hybrid_finetune.py                      # flashmotion: hybrid loss, tiny
    python hybrid_finetune.py --loss=diffusion     # the diffusion-only ablation
    python hybrid_finetune.py --loss=adversarial   # the adversarial-only ablation
    python hybrid_finetune.py --resume=true
"""

import copy
import json
import os
import sys
import time
import uuid
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

import adapter as A
import data
import distill as D
import metrics
import model as M
from common import (UserError, apply_overrides, autocast, check_ranks_in_sync, cleanup_distributed, ema_update,
                    load_checkpoint, lr_at, noise_seed, open_log, refuse_overwrite, require_at_least,
                    save_checkpoint, setup_distributed)

LOSSES = ("hybrid", "diffusion", "adversarial")


class DiffusionDiscriminator(nn.Module):
    """A frozen controllable slow model as the feature backbone, with one small
    trainable head per chosen block. Each head scores every token; the logit
    of a clip is the mean over tokens, summed over heads."""

    def __init__(self, backbone, blocks):
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.blocks = list(blocks)
        dim = backbone.cfg.dim
        self.heads = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))
                                   for _ in self.blocks)

    def forward(self, clip, t, noise, conditions):
        """clip (B, T, C, H, W) is re-noised to time t (B,) and scored: logits (B,)."""
        x_t = M.add_noise(clip, noise, t)
        _, features = self.backbone(x_t, t, return_features=True, **conditions)
        return sum(head(features[i]).mean(dim=(1, 2)) for head, i in zip(self.heads, self.blocks))


def discriminator_loss(logits_real, logits_fake):
    """Non-saturating GAN loss of the discriminator."""
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def generator_adversarial_loss(logits_fake):
    """Non-saturating GAN loss of the generator side (here: the adapter)."""
    return F.softplus(-logits_fake).mean()


def index_list(opt, key, count, what):
    """A flag like --disc_blocks=1,3,5 as a list of ints, each in 0..count-1."""
    text = getattr(opt, key)
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(not 0 <= v < count for v in values):
        raise UserError(f"--{key} must be comma-separated {what} in 0..{count - 1}, got '{text}'")
    return values


def main(argv):
    # ------------------------------------------------------------ config ----
    opt = SimpleNamespace(**apply_overrides(dict(
        config="tiny",
        fast_generator_ckpt="",    # default: checkpoints/fast_generator_<config>.pt
        slow_generator_ckpt="",    # default: checkpoints/slow_generator_<config>.pt (the discriminator backbone)
        adapter_ckpt="",           # the slow adapter; default: checkpoints/slow_adapter_controlnet_<config>.pt
        loss="hybrid",             # hybrid | diffusion | adversarial
        lambda_adv=0.1,            # weight of the adversarial loss in the hybrid objective
        diffusion_steps="0,1,2,3", # steps k of the 4-step list where the diffusion loss applies
        disc_blocks="1,3,5",       # backbone blocks whose features the discriminator heads read
        out_dir="",                # default: runs/fast_adapter_<loss>_<config>
        batch_size=8,
        max_steps=300,
        stop_at=0,
        lr=1e-4,                   # adapter
        lr_disc=2e-3,              # discriminator heads
        disc_max_t=0.6,            # the discriminator sees clips re-noised at t ~ U(0.02, disc_max_t)
        disc_steps=1,              # discriminator updates per adapter update
        warmup=20,
        grad_clip=1.0,
        ema_decay=0.99,
        ckpt_interval=50,
        sample_interval=200,       # held-out mIoU and a GIF every this many steps (0: never)
        eval_scenes=16,
        num_workers=1,
        seed=0,
        compile=torch.cuda.is_available(),
        resume=False,
    ), argv))
    # ------------------------------------------------------------------------
    if opt.config not in data.CONFIGS:
        raise UserError(f"--config must be one of {', '.join(data.CONFIGS)}")
    if opt.loss not in LOSSES:
        raise UserError(f"--loss must be one of {', '.join(LOSSES)}, got '{opt.loss}'")
    require_at_least(opt, ("batch_size", "max_steps", "ckpt_interval", "disc_steps", "eval_scenes"))
    if not 0.02 < opt.disc_max_t <= 1:
        raise UserError(f"--disc_max_t must be in (0.02, 1], got {opt.disc_max_t}")
    disc_blocks = index_list(opt, "disc_blocks", M.config_for(opt.config).depth, "blocks")
    diffusion_steps = set(index_list(opt, "diffusion_steps", len(D.FAST_TIMES), "steps"))
    opt.fast_generator_ckpt = opt.fast_generator_ckpt or f"checkpoints/fast_generator_{opt.config}.pt"
    opt.slow_generator_ckpt = opt.slow_generator_ckpt or f"checkpoints/slow_generator_{opt.config}.pt"
    opt.adapter_ckpt = opt.adapter_ckpt or f"checkpoints/slow_adapter_controlnet_{opt.config}.pt"
    opt.out_dir = opt.out_dir or f"runs/fast_adapter_{opt.loss}_{opt.config}"
    ckpt_path = os.path.join(opt.out_dir, "ckpt.pt")
    refuse_overwrite(ckpt_path, opt.resume)
    use_diffusion, use_adversarial = opt.loss in ("hybrid", "diffusion"), opt.loss in ("hybrid", "adversarial")

    rank, world_size, device = setup_distributed()
    master = rank == 0
    torch.manual_seed(opt.seed)

    # -------------------------------------------------------------- setup ---
    fast_ckpt = load_checkpoint(opt.fast_generator_ckpt, kind="fast_generator")
    slow_ckpt = load_checkpoint(opt.slow_generator_ckpt, kind="slow_generator")
    adapter_ckpt = load_checkpoint(opt.adapter_ckpt, kind="slow_adapter")
    if fast_ckpt["parent"] != slow_ckpt["run_id"] or adapter_ckpt["parent"] != slow_ckpt["run_id"]:
        raise UserError(f"the fast generator ({fast_ckpt['parent_path']}) and the slow adapter "
                        f"({adapter_ckpt['parent_path']}) must both come from {opt.slow_generator_ckpt}")
    fast_generator = M.model_from_checkpoint(fast_ckpt).to(device).requires_grad_(False).eval()
    slow_generator = M.model_from_checkpoint(slow_ckpt).to(device).requires_grad_(False).eval()
    # The adapter starts as the slow adapter, now on the fast generator (the naive pairing).
    raw_adapter = A.adapter_from_checkpoint(adapter_ckpt, fast_generator, fast_ckpt,
                                            allow_other_generator=True).to(device).requires_grad_(True)
    ema_adapter = copy.deepcopy(raw_adapter).requires_grad_(False)
    slow_adapter = A.adapter_from_checkpoint(adapter_ckpt, slow_generator, slow_ckpt).to(device)
    discriminator = DiffusionDiscriminator(A.Controlled(slow_generator, slow_adapter.requires_grad_(False)),
                                           disc_blocks).to(device)
    opt_adapter = torch.optim.AdamW(raw_adapter.parameters(), lr=opt.lr, betas=(0.0, 0.99), weight_decay=0.0)
    opt_disc = torch.optim.AdamW(discriminator.heads.parameters(), lr=opt.lr_disc, betas=(0.0, 0.99),
                                 weight_decay=0.0)
    step, run_id = 0, uuid.uuid4().hex[:12]
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, kind="fast_adapter", map_location=device)
        if ckpt["parent"] != fast_ckpt["run_id"] or ckpt["loss"] != opt.loss:
            raise UserError(f"{ckpt_path} is a '{ckpt['loss']}' adapter of fast generator run {ckpt['parent']}; "
                            f"this run asks for '{opt.loss}' on run {fast_ckpt['run_id']}")
        for module, key in ((raw_adapter, "model"), (ema_adapter, "ema"), (discriminator.heads, "disc_heads"),
                            (opt_adapter, "opt_adapter"), (opt_disc, "opt_disc")):
            module.load_state_dict(ckpt[key])
        step, run_id = ckpt["step"], ckpt["run_id"]
        del ckpt
    if master:
        print(f"hybrid finetune, loss '{opt.loss}' (lambda_adv {opt.lambda_adv}): {raw_adapter.config()} adapter "
              f"on the fast generator {opt.fast_generator_ckpt}, discriminator heads on blocks {disc_blocks}, "
              f"device {device}, {world_size} rank(s), step {step}/{opt.max_steps}")

    def wrap(module):
        module = torch.compile(module) if opt.compile else module
        return DDP(module, device_ids=[device.index] if device.type == "cuda" else None) if world_size > 1 else module

    train_model = wrap(A.Controlled(fast_generator, raw_adapter))
    ema_model = A.Controlled(fast_generator, ema_adapter)
    train_disc = wrap(discriminator)  # only its heads train (the backbone is frozen)
    times = D.fast_times(device=device)

    shape = data.CONFIGS[opt.config]
    stream = data.SpriteWorld(**shape, batch_size=opt.batch_size, seed=opt.seed, rank=rank, start=step)
    batches = iter(DataLoader(stream, batch_size=None, num_workers=opt.num_workers,
                              persistent_workers=opt.num_workers > 0))
    noise_gen = torch.Generator(device=device)
    scenes = data.SpriteWorld(**shape, batch_size=opt.eval_scenes, seed=data.HELD_OUT_SEED).batch(0)
    naive = None  # the slow adapter as is on the fast generator, measured once

    def disc_time(B):
        # Low and middle noise only: above t ~ 0.6 the noise hides what tells a
        # generated clip from a real one, and the heads learn nothing there.
        return 0.02 + (opt.disc_max_t - 0.02) * torch.rand(B, generator=noise_gen, device=device)

    def held_out(model):
        first = scenes["video"][:, 0].to(device)
        with autocast(device):
            videos = D.fast_generate(model, first, torch.Generator(device=device).manual_seed(0),
                                     trajectory=scenes["box_maps"].to(device))
        videos = videos.float().cpu()
        return videos, metrics.mean_of(metrics.batch_trajectory_accuracy(videos, scenes))

    def evaluate():
        nonlocal naive
        if naive is None:
            naive = held_out(A.Controlled(fast_generator, copy.deepcopy(slow_adapter)))
        videos, accuracy = held_out(ema_model)
        rows = []
        for i in range(min(4, opt.eval_scenes)):
            boxes = scenes["boxes"][i, :int(scenes["n_objects"][i])].numpy()
            rows.append([data.draw_boxes(data.to_uint8(v[i]), boxes, 4) for v in (scenes["video"], naive[0], videos)])
        data.save_video(os.path.join(opt.out_dir, "samples", f"step_{step:06d}.gif"), data.video_grid(rows))
        return {"naive": naive[1], "finetuned": accuracy}

    def save():
        check_ranks_in_sync(raw_adapter)
        if master:
            save_checkpoint(ckpt_path, {
                "kind": "fast_adapter", "run_id": run_id, "parent": fast_ckpt["run_id"],
                "parent_path": opt.fast_generator_ckpt, "adapter_parent": adapter_ckpt["run_id"], "loss": opt.loss,
                "generator_config": M.config_dict(fast_generator), "adapter_config": raw_adapter.config(),
                "condition": "box", "step": step, "train_config": vars(opt),
                "model": raw_adapter.state_dict(), "ema": ema_adapter.state_dict(),
                "disc_heads": discriminator.heads.state_dict(), "opt_adapter": opt_adapter.state_dict(),
                "opt_disc": opt_disc.state_dict(),
            })

    # --------------------------------------------------------------- loop ---
    end_step = min(opt.stop_at or opt.max_steps, opt.max_steps)
    os.makedirs(opt.out_dir, exist_ok=True)
    log = open_log(opt.out_dir, step) if master else None
    bar = tqdm(total=end_step, initial=step, disable=not master, desc=f"stage 3 {opt.loss}", dynamic_ncols=True)
    last_time = time.time()
    while step < end_step:
        batch = next(batches)
        video = batch["video"].to(device)  # (B, T, C, H, W)
        cond = dict(first_frame=video[:, 0], trajectory=batch["box_maps"].to(device))
        B = len(video)
        noise_gen.manual_seed(noise_seed(opt.seed, rank, step))
        for group in opt_adapter.param_groups:
            group["lr"] = lr_at(step, opt.lr, opt.warmup, opt.max_steps)
        # One step k of the 4-step list for the whole batch, keyed on the step alone (all ranks agree).
        # (diffusion-only draws among --diffusion_steps; with the adversarial loss every step trains.)
        choices = sorted(diffusion_steps) if opt.loss == "diffusion" else range(len(times))
        key = torch.Generator().manual_seed(opt.seed * 7919 + step)
        k = choices[int(torch.randint(len(choices), (1,), generator=key))]
        t_k = times[k].expand(B)
        record = {"step": step + 1, "k": k}
        loss = torch.zeros((), device=device)

        if use_diffusion and k in diffusion_steps:  # the real clip, noised to t_k, must come back as itself
            with autocast(device):
                noisy_real = M.add_noise(video, torch.randn(video.shape, generator=noise_gen, device=device), t_k)
                predicted = D.few_step_step(train_model, noisy_real, times[k], cond)
            diffusion = F.mse_loss(predicted.float(), video)
            loss = loss + diffusion
            record["diffusion"] = round(diffusion.item(), 5)

        if use_adversarial:  # the generator's own clip at step k, judged by the discriminator
            noise = torch.randn(video.shape, generator=noise_gen, device=device)
            with torch.no_grad(), autocast(device):
                x_k = D.few_step_sample(train_model, noise, times, cond, noise_gen, stop_after=k)
            with autocast(device):
                generated = D.few_step_step(train_model, x_k, times[k], cond)
                t = disc_time(B)
                renoise = torch.randn(video.shape, generator=noise_gen, device=device)
                adversarial = generator_adversarial_loss(discriminator(generated, t, renoise, cond).float())
            loss = loss + (opt.lambda_adv if opt.loss == "hybrid" else 1.0) * adversarial
            record["adversarial"] = round(adversarial.item(), 5)

        loss.backward()
        discriminator.heads.zero_grad(set_to_none=True)  # the adapter's loss must not train the heads
        record["adapter_grad_norm"] = round(torch.nn.utils.clip_grad_norm_(raw_adapter.parameters(),
                                                                           opt.grad_clip).item(), 5)
        opt_adapter.step()
        opt_adapter.zero_grad(set_to_none=True)
        ema_update(ema_adapter, raw_adapter, min(opt.ema_decay, (1 + step) / (10 + step)))

        if use_adversarial:  # discriminator heads: real clips vs the generator's (detached) clips
            for group in opt_disc.param_groups:
                group["lr"] = lr_at(step, opt.lr_disc, opt.warmup, opt.max_steps)
            fake = generated.detach().float()
            for _ in range(opt.disc_steps):
                t = disc_time(B)
                noise = torch.randn(video.shape, generator=noise_gen, device=device)
                both = {key: torch.cat([value, value]) for key, value in cond.items()}
                with autocast(device):  # one forward for real and fake (DDP wants one per backward)
                    logits = train_disc(torch.cat([video, fake]), torch.cat([t, t]), torch.cat([noise, noise]), both)
                logits_real, logits_fake = logits.float().chunk(2)
                disc_loss = discriminator_loss(logits_real, logits_fake)
                disc_loss.backward()
                opt_disc.step()
                opt_disc.zero_grad(set_to_none=True)
            record.update(disc=round(disc_loss.item(), 5),
                          d_accuracy=round(((logits_real > 0).float().mean() + (logits_fake < 0).float().mean()).item() / 2, 3))
        step += 1

        now = time.time()
        record.update(time=round(now, 1), samples_per_s=round(B * world_size / (now - last_time), 2))
        last_time = now
        bar.update(1)
        bar.set_postfix({key: record[key] for key in ("diffusion", "adversarial", "disc") if key in record})
        if step % opt.ckpt_interval == 0 or step == end_step:
            save()
        if master and opt.sample_interval and (step % opt.sample_interval == 0 or step == end_step):
            record["held_out"] = evaluate()
            a, b = record["held_out"]["finetuned"], record["held_out"]["naive"]
            bar.write(f"step {step}: held-out mIoU {a['miou']:.3f} (naive {b['miou']:.3f}), "
                      f"centre error {a['center_err_px']:.2f}px ({b['center_err_px']:.2f}px)")
        if master:
            log.write(json.dumps(record) + "\n")
            log.flush()
    bar.close()
    if master:
        print(f"{'done' if step == opt.max_steps else 'stopped'}: {ckpt_path} at step {step}/{opt.max_steps}")
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
