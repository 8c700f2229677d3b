"""Stage 3: hybrid diffusion + adversarial finetune of the adapter on the fast generator.

The heart of FlashMotion. The slow adapter on the 4-step fast generator as
is (the `naive` pairing) drifts and blurs; here it is finetuned on the frozen
fast generator, along its own 4-step path (backward simulation), with

  a diffusion loss     a real clip noised to step k's time must come back as
                       itself (with its true maps): it keeps objects on their paths;
  an adversarial loss  the paper's diffusion discriminator: the frozen slow generator
                       reads a clip re-noised at a random t; per chosen block a learnable
                       query token attends to the first-frame, trajectory and video tokens
                       and makes a real/fake logit (non-saturating, DMD2): clips stay sharp.

  adapter loss = adversarial + lambda(step) * diffusion        (--loss=hybrid, adapter_update)

with lambda falling as the paper's (paper_lambda): the diffusion loss leads first and brings
the trajectories back, the adversarial loss last, for sharpness. The ablations are other weights
of the same equation (LOSSES). --balance, not the paper's, first weights the adversarial term so
that its gradient is as large as the diffusion term's (balance_weight).

    python hybrid_finetune.py                      # flashmotion: the shipped mask ControlNet's recipe
    python hybrid_finetune.py --loss=diffusion     # diffusion-only (and adversarial, fixed_lambda)
"""

import copy
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics
from adapter import Controlled, adapter_from_checkpoint, trajectory_channels, trajectory_token_dim
from common import (Run, UserError, as_user_error, autocast, clipped_step, ema_decay_at, ema_update, load_checkpoint,
                    lr_at, noise_seed, parse_flags, require_at_least, require_indices, require_one_of, set_lr)
from model import (CONFIGS, FAST_TIMES, add_noise, config_dict, fast_generate, fast_times, few_step_sample,
                   few_step_step, model_from_checkpoint, pick_step, sample_training_time)
from video import comparison_video, save_video

DISC_MAX_T = 0.6  # --disc_noise=low: t ~ U(0.02, 0.6); above ~0.7 clips are hardly told apart (docs)

FLAGS = dict(
    config=("tiny", "micro | tiny | small: must match the checkpoints"),
    fast_generator_ckpt=("", "default checkpoints/fast_generator_<config>.pt"),
    slow_generator_ckpt=("", "the discriminator's backbone; default checkpoints/slow_generator_<config>.pt"),
    adapter_ckpt=("", "the slow adapter; default checkpoints/slow_adapter_controlnet_mask_<config>.pt"),
    loss=("hybrid", "hybrid (lambda schedule) | fixed_lambda | diffusion | adversarial: weights of the equation"),
    lambda_rate=(4.0, "how fast lambda falls: 1 / (rate * step / max_steps + 0.1); 4, the paper's 4e-3 a step "
                      "over its 1K steps"),
    balance=(True, "weight the adversarial term so that its gradient is as large as the diffusion term's "
                   "(balance_weight; not the paper's)"),
    disc_blocks=("1,3,5", "backbone blocks whose features the discriminator reads"),
    adv_steps=("0,1,2,3", "which of the 4 sampler steps the adversarial loss judges (k drawn among them)"),
    disc_noise=("low", "the discriminator's t: low, U(0.02, 0.6); dmd, DMD's shifted t in [0.02, 0.98] (DMD2)"),
    max_free=(0, "0 to this many free objects (no map) per training scene, as train_adapter.py"),
    out_dir=("", "default runs/fast_adapter_<loss>_<config>"),
    batch_size=(8, "clips per rank and step"),
    max_steps=(500, "length of the lr schedule"),
    stop_at=(0, "stop (with a checkpoint) after this step, to resume later; 0: run to max_steps"),
    time_limit=(0.0, "minutes: stop (with a checkpoint) after this long, to resume later; 0: no limit"),
    lr=(1e-4, "learning rate of the adapter"),
    lr_disc=(2e-3, "learning rate of the discriminator's classifier"),
    warmup=(20, "linear warmup steps"),
    grad_clip=(1.0, "gradient norm clip of the adapter"),
    ema_decay=(0.99, "EMA of the adapter, what is exported"),
    ckpt_interval=(50, "checkpoint every this many steps"),
    sample_interval=(200, "held-out mIoU and a GIF every this many steps (0: never)"),
    eval_steps=("", "comma-separated steps at which to measure too, e.g. early while lambda is high"),
    eval_scenes=(16, "held-out scenes measured"),
    num_workers=(1, "data processes per rank"),
    seed=(0, "seed of data and noise"),
    threads=(0, "CPU threads of this process; 0: every core (PyTorch's default)"),
    compile=(torch.cuda.is_available(), "torch.compile the trained networks (default on CUDA)"),
    resume=(False, "continue the run in out_dir"),
    recipe=("", "a named flag set of RECIPES below: lab, the course's 10-minute run (docs/course.md)"),
)
RECIPES = {"small": dict(max_steps=1000),  # --config=small; --recipe=lab: docs/course.md, lab 5
           "lab": dict(threads=1, max_steps=100, sample_interval=100, eval_steps="10,20,40,70", eval_scenes=8,
                       num_workers=0, out_dir="runs/lab_fast_adapter")}


# ------------------------------------------- the diffusion discriminator ---

class QueryClassifier(nn.Module):
    """The paper's classifier. Per block, a learnable query token attends
    (1) to itself and the first-frame tokens (the backbone's first temporal
    slot, where the given frame sits), (2) to the trajectory tokens, (3) to the
    block's video tokens; an MLP turns it into a logit. Trajectory and video
    tokens share a learnt position embedding."""

    def __init__(self, dim, heads, grid, map_dim, n_blocks):
        super().__init__()
        self.first_slot = grid[1] * grid[2]  # tokens of the first temporal slot
        self.position = nn.Parameter(torch.randn(1, grid[0] * self.first_slot, dim) * 0.02)
        self.trajectory_embed = nn.Linear(map_dim, dim)
        self.feature_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.queries = nn.Parameter(torch.randn(n_blocks, 1, dim) * 0.02)
        self.norms = nn.ModuleList(nn.ModuleList(nn.LayerNorm(dim) for _ in range(3)) for _ in range(n_blocks))
        self.attentions = nn.ModuleList(nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True)
                                                      for _ in range(3)) for _ in range(n_blocks))
        self.logits = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))
                                    for _ in range(n_blocks))

    def forward(self, features, maps):
        """features: per block (B, N, dim); maps (B, N, map_dim): the trajectory maps as tokens. Logits (B,)."""
        trajectory = self.trajectory_embed(maps) + self.position
        logit = 0
        for i, block_features in enumerate(features):
            video = self.feature_norm(block_features) + self.position
            q = self.queries[i].expand(len(video), -1, -1)  # (B, 1, dim)
            (norm_1, norm_2, norm_3), (attend_1, attend_2, attend_3) = self.norms[i], self.attentions[i]
            h = norm_1(torch.cat([q, video[:, :self.first_slot]], dim=1))  # (1) with the first-frame tokens
            q = q + attend_1(h[:, :1], h, h, need_weights=False)[0]
            h = norm_2(q)                                                   # (2) the trajectory tokens
            q = q + attend_2(h, trajectory, trajectory, need_weights=False)[0]
            h = norm_3(q)                                                   # (3) the video tokens
            q = q + attend_3(h, video, video, need_weights=False)[0]
            logit = logit + self.logits[i](q[:, 0]).squeeze(-1)
        return logit


class DiffusionDiscriminator(nn.Module):
    """The frozen slow generator as the backbone, a QueryClassifier on its chosen blocks."""

    def __init__(self, slow_generator, blocks):
        super().__init__()
        self.blocks = list(blocks)
        self.backbone = slow_generator.requires_grad_(False).eval()
        cfg = slow_generator.cfg
        self.classifier = QueryClassifier(cfg.dim, cfg.heads, slow_generator.grid, trajectory_token_dim(cfg),
                                          len(self.blocks))

    def forward(self, clip, t, noise, conditions):
        """clip (B, T, C, H, W) re-noised to t (B,), scored: logits (B,). The maps reach only the classifier."""
        x_t = add_noise(clip, noise, t)
        _, features = self.backbone(x_t, t, conditions["first_frame"], return_features=True)
        maps = self.backbone.patchify_pixels(trajectory_channels(conditions["trajectory"], None))  # (B, N, map_dim)
        return self.classifier([features[i] for i in self.blocks], maps.to(features[0].dtype))


def discriminator_loss(logits_real, logits_fake):
    """Non-saturating GAN loss of the discriminator; the adapter's is softplus(-logits_fake)."""
    return F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean()


def disc_time(batch, rng, device, kind):
    """The discriminator's t: low, U(0.02, DISC_MAX_T); dmd, DMD's shifted t (distill.py), as DMD2's GAN."""
    if kind == "dmd":
        return sample_training_time(batch, rng, device).clamp(0.02, 0.98)
    return 0.02 + (DISC_MAX_T - 0.02) * torch.rand(batch, generator=rng, device=device)


def paper_lambda(step, max_steps, rate=4.0):
    """lambda(step), the diffusion loss's weight beside the adversarial loss.
    The paper's 1 / (4e-3 step + 0.1) ran over ~1K steps; here `step` is
    measured in thousandths of the run, so at the paper's rate 4: 10 at
    first, 1 at 22.5% of it, 0.24 at its end."""
    return 1.0 / (rate * step / max_steps + 0.1)


# --loss: FlashMotion and its ablations as weights of one equation, (the adversarial
# term's weight, lambda); lambda None follows paper_lambda. A term weighted 0 is not computed.
LOSSES = {
    "hybrid": (1.0, None),         # FlashMotion: lambda falls from 10 to 0.24
    "fixed_lambda": (1.0, 1.0),    # ablation: lambda = 1 throughout
    "diffusion": (0.0, 1.0),       # ablation: the diffusion loss alone
    "adversarial": (1.0, 0.0),     # ablation: the adversarial loss alone
}


def loss_weights(opt, step):
    """(adversarial weight, lambda) of --loss at this step."""
    adversarial_weight, lam = LOSSES[opt.loss]
    return adversarial_weight, paper_lambda(step, opt.max_steps, opt.lambda_rate) if lam is None else lam


# ---------------- the adapter's two losses, the paper's equation, the classifier's update ---

def diffusion_loss(model, video, times, k, cond, rng):
    """The real clip, noised to the time of step k, must come back as itself."""
    with autocast(video.device):
        noise = torch.randn(video.shape, generator=rng, device=video.device)
        predicted = few_step_step(model, add_noise(video, noise, times[k].expand(len(video))), times[k], cond)
    return F.mse_loss(predicted.float(), video)


def adversarial_loss(model, discriminator, video, times, k, cond, rng, disc_noise):
    """The adapted fast generator's own clip at step k (backward simulation:
    its first k steps run without grad), judged by the discriminator.
    Returns (the non-saturating loss, the clip detached)."""
    device = video.device
    noise = torch.randn(video.shape, generator=rng, device=device)
    with torch.no_grad(), autocast(device):
        x_k = few_step_sample(model, noise, times, cond, rng, stop_after=k)
    with autocast(device):
        generated = few_step_step(model, x_k, times[k], cond)
        t = disc_time(len(video), rng, device, disc_noise)
        renoise = torch.randn(video.shape, generator=rng, device=device)
        loss = F.softplus(-discriminator(generated, t, renoise, cond).float()).mean()  # non-saturating
    return loss, generated.detach().float()


def adapter_update(train_model, adapter, discriminator, video, times, k, k_adv, cond, weights, opt, rng, record):
    """The adapter's gradient from the paper's equation, one loss and one backward:

        loss = adversarial_weight * adversarial + lambda * diffusion

    weights: (adversarial_weight, lambda) of --loss (LOSSES). Returns the
    generated clips the discriminator learns from (None without the adversarial term)."""
    adversarial_weight, lam = weights
    diffusion, adversarial, fake = 0.0, 0.0, None
    if lam:
        diffusion = diffusion_loss(train_model, video, times, k, cond, rng)
        record["diffusion"] = round(diffusion.item(), 5)
    if adversarial_weight:
        adversarial, fake = adversarial_loss(train_model, discriminator, video, times, k_adv, cond, rng, opt.disc_noise)
        record["adversarial"] = round(adversarial.item(), 5)
    scale = balance_weight(diffusion, adversarial, adapter) if lam and adversarial_weight and opt.balance else 1.0
    record["adversarial_scale"] = round(scale, 5)
    adversarial_weight *= scale
    loss = adversarial_weight * adversarial + lam * diffusion
    loss.backward()
    discriminator.classifier.zero_grad(set_to_none=True)  # the adapter's loss must not train the classifier
    return fake


def balance_weight(diffusion, adversarial, adapter):
    """Not the paper's: the adversarial term's weight that makes its gradient on the
    adapter as large as the diffusion term's (VQGAN's adaptive weight, computed
    first, as taming-transformers does). Ours is 3 to 100 times the diffusion one
    (docs/results.md), so unweighted it would lead after a few percent of the run;
    balanced, lambda = 10 -> 0.24 hands over as the paper intends. It costs a
    backward pass of each loss more: a tiny step takes a third longer (docs/results.md)."""
    parameters = list(adapter.parameters())
    return (gradient_norm(diffusion, parameters) / (gradient_norm(adversarial, parameters) + 1e-12)).item()


def gradient_norm(loss, parameters):
    """The norm of the loss's gradient on the parameters, averaged over the ranks
    as DDP averages it; the graph is kept for the backward pass."""
    gradients = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    gradients = [torch.zeros_like(p) if g is None else g for g, p in zip(gradients, parameters)]
    if dist.is_initialized():
        for g in gradients:
            dist.all_reduce(g)
            g /= dist.get_world_size()
    return torch.sqrt(sum((g.float() ** 2).sum() for g in gradients))


def discriminator_update(discriminator, optimizer, real, fake, cond, rng, disc_noise):
    """One step of the classifier: real clips against generated ones, re-noised
    alike, in one forward (DDP wants one per backward). Returns (loss, accuracy)."""
    t = disc_time(len(real), rng, real.device, disc_noise)
    noise = torch.randn(real.shape, generator=rng, device=real.device)
    with autocast(real.device):
        logits = discriminator(torch.cat([real, fake]), torch.cat([t, t]), torch.cat([noise, noise]),
                               {key: torch.cat([value, value]) for key, value in cond.items()})
    logits_real, logits_fake = logits.float().chunk(2)
    loss = discriminator_loss(logits_real, logits_fake)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    accuracy = ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean()).item() / 2
    return loss.item(), accuracy


# ------------------------------------------------------------------ loop ---

def check_flags(opt):
    """Refuse wrong flags, fill in the default paths; returns the discriminator's blocks, the GAN's
    steps and the extra steps at which to measure."""
    require_one_of(opt, "config", CONFIGS)
    require_one_of(opt, "loss", LOSSES)
    require_one_of(opt, "disc_noise", ("low", "dmd"))
    require_at_least(opt, ("batch_size", "max_steps", "ckpt_interval", "eval_scenes"))
    opt.fast_generator_ckpt = opt.fast_generator_ckpt or f"checkpoints/fast_generator_{opt.config}.pt"
    opt.slow_generator_ckpt = opt.slow_generator_ckpt or f"checkpoints/slow_generator_{opt.config}.pt"
    opt.adapter_ckpt = opt.adapter_ckpt or f"checkpoints/slow_adapter_controlnet_mask_{opt.config}.pt"
    opt.out_dir = opt.out_dir or f"runs/fast_adapter_{opt.loss}_{opt.config}"
    return (require_indices(opt, "disc_blocks", CONFIGS[opt.config].depth),
            require_indices(opt, "adv_steps", len(FAST_TIMES)),
            require_indices(opt, "eval_steps") if opt.eval_steps else [])


def networks(opt, run, blocks):
    """The frozen fast generator, the adapter to finetune and its EMA, the naive pairing as is, the discriminator."""
    fast_ckpt = load_checkpoint(opt.fast_generator_ckpt, kind="fast_generator")
    slow_ckpt = load_checkpoint(opt.slow_generator_ckpt, kind="slow_generator")
    adapter_ckpt = load_checkpoint(opt.adapter_ckpt, kind="slow_adapter")
    if fast_ckpt["parent"] != slow_ckpt["run_id"] or adapter_ckpt["parent"] != slow_ckpt["run_id"]:
        raise UserError(f"the fast generator ({fast_ckpt['parent_path']}) and the slow adapter "
                        f"({adapter_ckpt['parent_path']}) must both come from {opt.slow_generator_ckpt}")
    if run.saved is not None and (run.saved["parent"] != fast_ckpt["run_id"] or run.saved["loss"] != opt.loss):
        raise UserError(f"{run.path} is a '{run.saved['loss']}' adapter of fast generator run "
                        f"{run.saved['parent']}; this run asks for '{opt.loss}' on run {fast_ckpt['run_id']}")
    fast_generator = model_from_checkpoint(fast_ckpt).to(run.device).requires_grad_(False).eval()
    slow_generator = model_from_checkpoint(slow_ckpt).to(run.device).requires_grad_(False).eval()
    naive = lambda: adapter_from_checkpoint(adapter_ckpt, fast_generator, fast_ckpt, allow_other_generator=True)
    with as_user_error("--adapter_ckpt"):
        adapter = naive().to(run.device).requires_grad_(True)
    ema_adapter = copy.deepcopy(adapter).requires_grad_(False)
    naive_pairing = Controlled(fast_generator, naive().to(run.device).requires_grad_(False))
    discriminator = DiffusionDiscriminator(slow_generator, blocks).to(run.device)
    return fast_ckpt, adapter_ckpt, fast_generator, adapter, ema_adapter, naive_pairing, discriminator


@torch.no_grad()
def held_out(model, scenes, shift, device):
    """The 4-step clips of the held-out scenes and their mean trajectory accuracy."""
    with autocast(device):
        rng = torch.Generator(device=device).manual_seed(0)
        videos = fast_generate(model, scenes["video"][:, 0].to(device), shift, rng,
                               trajectory=model.trajectory(scenes).to(device)).float().cpu()
    return videos, metrics.mean_of(metrics.batch_trajectory_accuracy(videos, scenes))


def main(argv):
    opt = parse_flags(FLAGS, argv, __doc__, RECIPES)
    blocks, adv_steps, eval_steps = check_flags(opt)
    run = Run(opt, kind="fast_adapter")
    device = run.device
    fast_ckpt, adapter_ckpt, fast_generator, adapter, ema_adapter, naive_pairing, discriminator = \
        networks(opt, run, blocks)
    optimizer_adapter = torch.optim.AdamW(adapter.parameters(), lr=opt.lr, betas=(0.0, 0.99), weight_decay=0.0)
    optimizer_discriminator = torch.optim.AdamW(discriminator.classifier.parameters(), lr=opt.lr_disc,
                                                betas=(0.0, 0.99), weight_decay=0.0)
    run.restore(model=adapter, ema=ema_adapter, discriminator=discriminator.classifier,
                optimizer_adapter=optimizer_adapter, optimizer_discriminator=optimizer_discriminator)
    if run.master:
        print(f"stage 3, loss '{opt.loss}': {adapter.config()} adapter ({adapter.condition} maps) on fast generator "
              f"{opt.fast_generator_ckpt}, device {device}, {run.world_size} rank(s), step {run.step}/{opt.max_steps}")
    controlled = Controlled(fast_generator, adapter)
    train_model, train_disc = run.wrap(controlled), run.wrap(discriminator)  # the backbone is frozen
    ema_model = Controlled(fast_generator, ema_adapter)
    shift = fast_ckpt["time_shift"]  # the 4-step sampler the fast generator was distilled for
    times = fast_times(shift, device)
    shape = data.video_shape(opt.config)
    batches = run.batches(data.SpriteWorld(**shape, batch_size=opt.batch_size, seed=opt.seed, rank=run.rank,
                                           start=run.step, max_free=opt.max_free))
    rng = torch.Generator(device=device)
    scenes = data.SpriteWorld(**shape, batch_size=opt.eval_scenes, seed=data.HELD_OUT_SEED).batch(0)
    naive = None  # the naive pairing on the held-out scenes, measured once
    for step in run.steps(f"stage 3 {opt.loss}"):
        batch = next(batches)
        video = fast_generator.encode(batch["video"].to(device))  # (B, *fast_generator.space)
        cond = dict(first_frame=video[:, 0], trajectory=controlled.trajectory(batch).to(device))
        rng.manual_seed(noise_seed(opt.seed, run.rank, step))
        set_lr(optimizer_adapter, lr_at(step, opt.lr, opt.warmup, opt.max_steps))
        k = pick_step(opt.seed, step, len(times))  # one step of the 4-step list for the whole batch
        k_adv = adv_steps[pick_step(opt.seed, step, len(adv_steps))]  # k itself when the GAN judges every step
        weights = loss_weights(opt, step)
        record = {"k": k, "k_adv": k_adv, "lambda": round(weights[1], 4)}
        fake = adapter_update(train_model, adapter, discriminator, video, times, k, k_adv, cond, weights, opt, rng,
                              record)
        record["adapter_grad_norm"] = round(clipped_step(optimizer_adapter, adapter, opt.grad_clip), 5)
        ema_update(ema_adapter, adapter, ema_decay_at(step, opt.ema_decay))
        if fake is not None:  # the classifier learns from the same generated clips
            set_lr(optimizer_discriminator, lr_at(step, opt.lr_disc, opt.warmup, opt.max_steps))
            disc_loss, accuracy = discriminator_update(train_disc, optimizer_discriminator, video, fake, cond, rng,
                                                       opt.disc_noise)
            record.update(disc=round(disc_loss, 5), d_accuracy=round(accuracy, 3))
        if run.master and run.due(opt.sample_interval, at=eval_steps):
            naive = naive or held_out(naive_pairing, scenes, shift, device)
            videos, accuracy = held_out(ema_model, scenes, shift, device)
            save_video(run.sample_path(), comparison_video(scenes, [naive[0], videos], range(min(4, opt.eval_scenes)),
                                                           ["naive", "finetuned"]))
            record["held_out"] = {"naive": naive[1], "finetuned": accuracy}
            run.write(metrics.versus(accuracy, naive[1], "naive"))
        run.log(record, clips=len(video))
        if run.due(opt.ckpt_interval):
            run.save(adapter, parent=fast_ckpt["run_id"], parent_path=opt.fast_generator_ckpt, loss=opt.loss,
                     adapter_parent=adapter_ckpt["run_id"], generator_config=config_dict(fast_generator),
                     adapter_config=adapter.config(), condition=adapter.condition, model=adapter.state_dict(),
                     ema=ema_adapter.state_dict(), discriminator=discriminator.classifier.state_dict(),
                     optimizer_adapter=optimizer_adapter.state_dict(),
                     optimizer_discriminator=optimizer_discriminator.state_dict())
            run.draw_curves()


if __name__ == "__main__":
    main(sys.argv[1:])
