"""Stage 3: hybrid diffusion + adversarial finetune of the adapter on the fast generator.

The heart of FlashMotion. The slow adapter was trained on the slow
generator; plugged into the 4-step fast generator as is (the `naive`
pairing) its objects drift and blur. Here it is finetuned on the frozen fast
generator, along the same 4-step path the fast generator samples
(backward simulation, model.few_step_sample), with

  a diffusion loss     at a step k of the 4-step list, the adapted fast
                       generator's clean prediction of a noised real clip
                       (with its true trajectory maps) is regressed to that
                       clip: direct supervision that keeps objects on their
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
backward through the whole backbone. The discriminator sees low and middle
noise only, t ~ U(0.02, disc_max_t), and its heads learn fast: above t ~ 0.7
real and generated clips are hardly told apart (docs/results.md, stage 3).

    python hybrid_finetune.py                      # flashmotion: hybrid loss, tiny
    python hybrid_finetune.py --loss=diffusion     # the diffusion-only ablation
    python hybrid_finetune.py --loss=adversarial   # the adversarial-only ablation
    python hybrid_finetune.py --resume=true
"""

import copy
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics
from adapter import Controlled, adapter_from_checkpoint
from common import (Run, UserError, autocast, ema_decay_at, ema_update, load_checkpoint, lr_at, noise_seed,
                    parse_flags, require_at_least, require_one_of, set_lr)
from model import (CONFIGS, FAST_TIMES, add_noise, config_dict, fast_generate, fast_times, few_step_sample,
                   few_step_step, model_from_checkpoint, video_shape)

LOSSES = ("hybrid", "diffusion", "adversarial")

FLAGS = dict(
    config=("tiny", "micro | tiny | small: must match the checkpoints"),
    fast_generator_ckpt=("", "default checkpoints/fast_generator_<config>.pt"),
    slow_generator_ckpt=("", "the discriminator's backbone; default checkpoints/slow_generator_<config>.pt"),
    adapter_ckpt=("", "the slow adapter; default checkpoints/slow_adapter_controlnet_<config>.pt"),
    loss=("hybrid", "hybrid | diffusion | adversarial"),
    lambda_adv=(0.1, "weight of the adversarial loss in the hybrid objective"),
    diffusion_steps=("0,1,2,3", "steps k of the 4-step list where the diffusion loss applies"),
    disc_blocks=("1,3,5", "backbone blocks whose features the discriminator heads read"),
    out_dir=("", "default runs/fast_adapter_<loss>_<config>"),
    batch_size=(8, "clips per rank and step"),
    max_steps=(300, "length of the lr schedule"),
    stop_at=(0, "stop (with a checkpoint) after this step, to resume later; 0: run to max_steps"),
    time_limit=(0.0, "minutes: stop (with a checkpoint) after this long, to resume later; 0: no limit"),
    lr=(1e-4, "learning rate of the adapter"),
    lr_disc=(2e-3, "learning rate of the discriminator heads"),
    disc_max_t=(0.6, "the discriminator sees clips re-noised at t ~ U(0.02, disc_max_t)"),
    disc_steps=(1, "discriminator updates per adapter update"),
    warmup=(20, "linear warmup steps"),
    grad_clip=(1.0, "gradient norm clip of the adapter"),
    ema_decay=(0.99, "EMA of the adapter, what is exported"),
    ckpt_interval=(50, "checkpoint every this many steps"),
    sample_interval=(200, "held-out mIoU and a GIF every this many steps (0: never)"),
    eval_scenes=(16, "held-out scenes measured"),
    num_workers=(1, "data processes per rank"),
    seed=(0, "seed of data and noise"),
    compile=(torch.cuda.is_available(), "torch.compile the trained networks (default on CUDA)"),
    resume=(False, "continue the run in out_dir"),
)


# ------------------------------------------- the diffusion discriminator ---

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
        x_t = add_noise(clip, noise, t)
        _, features = self.backbone(x_t, t, return_features=True, **conditions)
        return sum(head(features[i]).mean(dim=(1, 2)) for head, i in zip(self.heads, self.blocks))


def discriminator_loss(logits_real, logits_fake):
    """Non-saturating GAN loss of the discriminator."""
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def generator_adversarial_loss(logits_fake):
    """Non-saturating GAN loss of the generator side (here: the adapter)."""
    return F.softplus(-logits_fake).mean()


def disc_time(batch, max_t, generator, device):
    """The discriminator's noise levels: low and middle only. Above t ~ 0.6 the
    noise hides what tells a generated clip from a real one, and the heads
    learn nothing there."""
    return 0.02 + (max_t - 0.02) * torch.rand(batch, generator=generator, device=device)


# ------------------------------------------ the adapter's two losses, the heads' update ---

def diffusion_loss(model, video, times, k, cond, noise_gen):
    """The real clip, noised to the time of step k, must come back as itself:
    direct supervision (in the generator's space) that keeps objects on their paths."""
    with autocast(video.device):
        noise = torch.randn(video.shape, generator=noise_gen, device=video.device)
        predicted = few_step_step(model, add_noise(video, noise, times[k].expand(len(video))), times[k], cond)
    return F.mse_loss(predicted.float(), video)


def adversarial_loss(model, discriminator, video, times, k, cond, max_t, noise_gen):
    """The adapted fast generator's own clip at step k (backward simulation:
    its first k steps run without grad), judged by the discriminator.
    Returns (the non-saturating loss, the clip detached)."""
    device = video.device
    noise = torch.randn(video.shape, generator=noise_gen, device=device)
    with torch.no_grad(), autocast(device):
        x_k = few_step_sample(model, noise, times, cond, noise_gen, stop_after=k)
    with autocast(device):
        generated = few_step_step(model, x_k, times[k], cond)
        t = disc_time(len(video), max_t, noise_gen, device)
        renoise = torch.randn(video.shape, generator=noise_gen, device=device)
        loss = generator_adversarial_loss(discriminator(generated, t, renoise, cond).float())
    return loss, generated.detach().float()


def discriminator_update(discriminator, optimizer, real, fake, cond, max_t, noise_gen):
    """One step of the heads: real clips against generated ones, re-noised alike,
    in one forward (DDP wants one per backward). Returns (loss, accuracy)."""
    t = disc_time(len(real), max_t, noise_gen, real.device)
    noise = torch.randn(real.shape, generator=noise_gen, device=real.device)
    both = {key: torch.cat([value, value]) for key, value in cond.items()}
    with autocast(real.device):
        logits = discriminator(torch.cat([real, fake]), torch.cat([t, t]), torch.cat([noise, noise]), both)
    logits_real, logits_fake = logits.float().chunk(2)
    loss = discriminator_loss(logits_real, logits_fake)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item(), ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean()).item() / 2


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


# ------------------------------------------------------------------ loop ---

def main(argv):
    opt = parse_flags(FLAGS, argv, __doc__)
    require_one_of(opt, "config", CONFIGS)
    require_one_of(opt, "loss", LOSSES)
    require_at_least(opt, ("batch_size", "max_steps", "ckpt_interval", "disc_steps", "eval_scenes"))
    if not 0.02 < opt.disc_max_t <= 1:
        raise UserError(f"--disc_max_t must be in (0.02, 1], got {opt.disc_max_t}")
    disc_blocks = index_list(opt, "disc_blocks", CONFIGS[opt.config].depth, "blocks")
    diffusion_steps = set(index_list(opt, "diffusion_steps", len(FAST_TIMES), "steps"))
    opt.fast_generator_ckpt = opt.fast_generator_ckpt or f"checkpoints/fast_generator_{opt.config}.pt"
    opt.slow_generator_ckpt = opt.slow_generator_ckpt or f"checkpoints/slow_generator_{opt.config}.pt"
    opt.adapter_ckpt = opt.adapter_ckpt or f"checkpoints/slow_adapter_controlnet_{opt.config}.pt"
    opt.out_dir = opt.out_dir or f"runs/fast_adapter_{opt.loss}_{opt.config}"
    use_diffusion, use_adversarial = opt.loss in ("hybrid", "diffusion"), opt.loss in ("hybrid", "adversarial")
    run = Run(opt, kind="fast_adapter")
    device = run.device

    # -- the frozen generators, the adapter to finetune, the discriminator
    fast_ckpt = load_checkpoint(opt.fast_generator_ckpt, kind="fast_generator")
    slow_ckpt = load_checkpoint(opt.slow_generator_ckpt, kind="slow_generator")
    adapter_ckpt = load_checkpoint(opt.adapter_ckpt, kind="slow_adapter")
    if fast_ckpt["parent"] != slow_ckpt["run_id"] or adapter_ckpt["parent"] != slow_ckpt["run_id"]:
        raise UserError(f"the fast generator ({fast_ckpt['parent_path']}) and the slow adapter "
                        f"({adapter_ckpt['parent_path']}) must both come from {opt.slow_generator_ckpt}")
    fast_generator = model_from_checkpoint(fast_ckpt).to(device).requires_grad_(False).eval()
    slow_generator = model_from_checkpoint(slow_ckpt).to(device).requires_grad_(False).eval()
    # The adapter starts as the slow adapter, now on the fast generator (the naive pairing).
    adapter = adapter_from_checkpoint(adapter_ckpt, fast_generator, fast_ckpt,
                                      allow_other_generator=True).to(device).requires_grad_(True)
    ema_adapter = copy.deepcopy(adapter).requires_grad_(False)
    slow_adapter = adapter_from_checkpoint(adapter_ckpt, slow_generator, slow_ckpt).to(device)
    discriminator = DiffusionDiscriminator(Controlled(slow_generator, slow_adapter.requires_grad_(False)),
                                           disc_blocks).to(device)
    opt_adapter = torch.optim.AdamW(adapter.parameters(), lr=opt.lr, betas=(0.0, 0.99), weight_decay=0.0)
    opt_disc = torch.optim.AdamW(discriminator.heads.parameters(), lr=opt.lr_disc, betas=(0.0, 0.99),
                                 weight_decay=0.0)
    if run.saved is not None and (run.saved["parent"] != fast_ckpt["run_id"] or run.saved["loss"] != opt.loss):
        raise UserError(f"{run.path} is a '{run.saved['loss']}' adapter of fast generator run "
                        f"{run.saved['parent']}; this run asks for '{opt.loss}' on run {fast_ckpt['run_id']}")
    run.restore(model=adapter, ema=ema_adapter, disc_heads=discriminator.heads, opt_adapter=opt_adapter,
                opt_disc=opt_disc)
    if run.master:
        print(f"hybrid finetune, loss '{opt.loss}' (lambda_adv {opt.lambda_adv}): {adapter.config()} adapter "
              f"reading {adapter.condition} maps on the fast generator {opt.fast_generator_ckpt}, discriminator "
              f"heads on blocks {disc_blocks}, device {device}, {run.world_size} rank(s), "
              f"step {run.step}/{opt.max_steps}")
    controlled = Controlled(fast_generator, adapter)
    train_model = run.wrap(controlled)
    ema_model = Controlled(fast_generator, ema_adapter)
    train_disc = run.wrap(discriminator)  # only its heads train (the backbone is frozen)
    times = fast_times(device=device)

    shape = video_shape(opt.config)
    batches = run.batches(data.SpriteWorld(**shape, batch_size=opt.batch_size, seed=opt.seed, rank=run.rank,
                                           start=run.step))
    noise_gen = torch.Generator(device=device)
    scenes = data.SpriteWorld(**shape, batch_size=opt.eval_scenes, seed=data.HELD_OUT_SEED).batch(0)
    naive = None  # the slow adapter as is on the fast generator, measured once

    def held_out(controlled):
        with autocast(device):
            videos = fast_generate(controlled, scenes["video"][:, 0].to(device),
                                   torch.Generator(device=device).manual_seed(0),
                                   trajectory=controlled.trajectory(scenes).to(device))
        videos = videos.float().cpu()
        return videos, metrics.mean_of(metrics.batch_trajectory_accuracy(videos, scenes))

    def evaluate():
        """Held-out accuracy of the naive pairing and the finetuned (EMA) adapter,
        and a GIF: target | naive | finetuned, target boxes drawn over."""
        nonlocal naive
        if naive is None:
            naive = held_out(Controlled(fast_generator, copy.deepcopy(slow_adapter)))
        videos, accuracy = held_out(ema_model)
        data.save_video(f"{opt.out_dir}/samples/step_{run.step:06d}.gif",
                        data.comparison_video(scenes, [naive[0], videos], range(min(4, opt.eval_scenes))))
        return {"naive": naive[1], "finetuned": accuracy}

    for step in run.steps(f"stage 3 {opt.loss}"):
        batch = next(batches)
        video = fast_generator.encode(batch["video"].to(device))  # (B, *fast_generator.space)
        cond = dict(first_frame=video[:, 0], trajectory=controlled.trajectory(batch).to(device))
        noise_gen.manual_seed(noise_seed(opt.seed, run.rank, step))
        set_lr(opt_adapter, lr_at(step, opt.lr, opt.warmup, opt.max_steps))
        # One step k of the 4-step list for the whole batch, keyed on the step alone (all ranks agree).
        # (diffusion-only draws among --diffusion_steps; with the adversarial loss every step trains.)
        choices = sorted(diffusion_steps) if opt.loss == "diffusion" else range(len(times))
        key = torch.Generator().manual_seed(opt.seed * 7919 + step)
        k = choices[int(torch.randint(len(choices), (1,), generator=key))]
        record = {"k": k}
        loss = torch.zeros((), device=device)
        if use_diffusion and k in diffusion_steps:
            diffusion = diffusion_loss(train_model, video, times, k, cond, noise_gen)
            loss = loss + diffusion
            record["diffusion"] = round(diffusion.item(), 5)
        if use_adversarial:
            adversarial, fake = adversarial_loss(train_model, discriminator, video, times, k, cond, opt.disc_max_t,
                                                 noise_gen)
            loss = loss + (opt.lambda_adv if opt.loss == "hybrid" else 1.0) * adversarial
            record["adversarial"] = round(adversarial.item(), 5)
        loss.backward()
        discriminator.heads.zero_grad(set_to_none=True)  # the adapter's loss must not train the heads
        record["adapter_grad_norm"] = round(torch.nn.utils.clip_grad_norm_(adapter.parameters(),
                                                                           opt.grad_clip).item(), 5)
        opt_adapter.step()
        opt_adapter.zero_grad(set_to_none=True)
        ema_update(ema_adapter, adapter, ema_decay_at(step, opt.ema_decay))

        if use_adversarial:  # the heads learn from the same generated clips
            set_lr(opt_disc, lr_at(step, opt.lr_disc, opt.warmup, opt.max_steps))
            for _ in range(opt.disc_steps):
                disc_loss, accuracy = discriminator_update(train_disc, opt_disc, video, fake, cond, opt.disc_max_t,
                                                           noise_gen)
            record.update(disc=round(disc_loss, 5), d_accuracy=round(accuracy, 3))

        if run.due(opt.ckpt_interval):
            run.save(adapter, parent=fast_ckpt["run_id"], parent_path=opt.fast_generator_ckpt,
                     adapter_parent=adapter_ckpt["run_id"], loss=opt.loss,
                     generator_config=config_dict(fast_generator), adapter_config=adapter.config(),
                     condition=adapter.condition, model=adapter.state_dict(), ema=ema_adapter.state_dict(),
                     disc_heads=discriminator.heads.state_dict(), opt_adapter=opt_adapter.state_dict(),
                     opt_disc=opt_disc.state_dict())
        if run.master and run.due(opt.sample_interval):
            record["held_out"] = evaluate()
            run.write(f"step {run.step}: " + metrics.versus(record["held_out"]["finetuned"],
                                                           record["held_out"]["naive"], "naive"))
        run.log(record, clips=len(video))


if __name__ == "__main__":
    main(sys.argv[1:])
