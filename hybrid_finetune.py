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
  an adversarial loss  from a diffusion discriminator: a frozen slow model
                       reads a clip re-noised at a random t, and a small
                       trainable classifier on several of its blocks'
                       features tells real clips from generated ones: what
                       keeps the 4-step clips sharp.

  adapter loss = adversarial + lambda(step) * diffusion        (--loss=hybrid)

with the paper's schedule lambda = 1 / (4e-3 step + 0.1) over its ~1K steps,
stretched to --max_steps: 10 at first (the diffusion loss leads and brings the
trajectories back), 1 at 22% of the run, 0.24 at the end (the adversarial
loss leads, for sharpness). --loss=fixed_lambda keeps lambda = 1 (the paper's
ablation); --loss=diffusion and --loss=adversarial train one loss alone.
Our two losses' gradients differ in scale far more than the paper's, so by
default (--balance) the adversarial gradient is first scaled to the
diffusion one's norm, and lambda then mixes gradients of equal size
(mix_gradients).

The discriminator, --discriminator=
  query   the paper's: the backbone is the frozen slow generator; per chosen
          block a learnable query token attends (1) to itself and the
          first-frame tokens, (2) to the trajectory tokens, (3) to the video
          tokens, then an MLP makes its logit; the logits are summed;
  joint   the same, but each video token first meets the trajectory token of
          its place (a per-token MLP on both), so that the classifier can
          check objects against their maps, which the query form cannot
          (docs/results.md, stage 3);
  tokens  the earlier form: the backbone is the slow generator with the slow
          adapter (the trajectory enters through it), and per-token MLP heads
          are averaged over the tokens.
The GAN loss is the non-saturating one (softplus), as in DMD2. No R1 penalty:
the discriminator only ever sees noised clips, which already smooths it
(the instance-noise argument of Diffusion-GAN), and R1 would need a second
backward through the whole backbone. It sees low and middle noise only,
t ~ U(0.02, disc_max_t): above t ~ 0.7 real and generated clips are hardly
told apart (docs/results.md, stage 3).

    python hybrid_finetune.py                      # flashmotion: hybrid loss, tiny
    python hybrid_finetune.py --loss=diffusion     # the diffusion-only ablation
    python hybrid_finetune.py --loss=adversarial   # the adversarial-only ablation
    python hybrid_finetune.py --loss=fixed_lambda  # lambda = 1 throughout
    python hybrid_finetune.py --resume=true
"""

import copy
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import metrics
from adapter import Controlled, adapter_from_checkpoint, trajectory_channels, trajectory_token_dim
from common import (Run, UserError, autocast, ema_decay_at, ema_update, load_checkpoint, lr_at, noise_seed,
                    parse_flags, require_at_least, require_one_of, set_lr)
from model import (CONFIGS, FAST_TIMES, add_noise, config_dict, fast_generate, fast_times, few_step_sample,
                   few_step_step, model_from_checkpoint, video_shape)

LOSSES = ("hybrid", "fixed_lambda", "diffusion", "adversarial")
DISCRIMINATORS = ("query", "joint", "tokens")

FLAGS = dict(
    config=("tiny", "micro | tiny | small: must match the checkpoints"),
    fast_generator_ckpt=("", "default checkpoints/fast_generator_<config>.pt"),
    slow_generator_ckpt=("", "the discriminator's backbone; default checkpoints/slow_generator_<config>.pt"),
    adapter_ckpt=("", "the slow adapter; default checkpoints/slow_adapter_controlnet_mask_<config>.pt"),
    loss=("hybrid", "hybrid (lambda schedule) | fixed_lambda | diffusion | adversarial"),
    lambda_rate=(4.0, "hybrid: lambda = 1 / (lambda_rate * step / max_steps + 0.1), the paper's over 1K steps"),
    discriminator=("query", "query (the paper's query-token classifier) | joint (query, video tokens joined with "
                            "their trajectory tokens) | tokens (per-token heads)"),
    balance=(True, "scale the adversarial gradient to the diffusion gradient's norm before lambda mixes them"),
    diffusion_steps=("0,1,2,3", "steps k of the 4-step list where the diffusion loss applies"),
    disc_blocks=("1,3,5", "backbone blocks whose features the discriminator reads"),
    out_dir=("", "default runs/fast_adapter_<loss>_<config>"),
    batch_size=(8, "clips per rank and step"),
    max_steps=(300, "length of the lr schedule"),
    stop_at=(0, "stop (with a checkpoint) after this step, to resume later; 0: run to max_steps"),
    time_limit=(0.0, "minutes: stop (with a checkpoint) after this long, to resume later; 0: no limit"),
    lr=(1e-4, "learning rate of the adapter"),
    lr_disc=(2e-3, "learning rate of the discriminator's classifier"),
    disc_max_t=(0.6, "the discriminator sees clips re-noised at t ~ U(0.02, disc_max_t)"),
    disc_steps=(1, "discriminator updates per adapter update"),
    mismatch=(False, "the classifier also learns that a real clip with drifted maps is fake (matching-aware)"),
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

def logit_head(dim):
    """An MLP from a feature vector (..., dim) to a real/fake logit (..., 1)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))


class QueryClassifier(nn.Module):
    """The paper's classifier. Per block, a learnable query token attends
    (1) to itself and the first-frame tokens (the backbone's first temporal
    slot, where the given frame sits), (2) to the trajectory tokens, (3) to the
    block's video tokens; an MLP turns it into a logit. Trajectory and video
    tokens share a learnt position embedding. With join (the `joint` form)
    each video token is first mixed with the trajectory token of its place:
    the query alone pools each side into one vector, and cannot compare them
    place by place (docs/results.md, stage 3)."""

    def __init__(self, dim, heads, grid, map_dim, n_blocks, join=False):
        super().__init__()
        self.first_slot = grid[1] * grid[2]  # tokens of the first temporal slot
        self.position = nn.Parameter(torch.randn(1, grid[0] * self.first_slot, dim) * 0.02)
        self.trajectory_embed = nn.Linear(map_dim, dim)
        self.feature_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.queries = nn.Parameter(torch.randn(n_blocks, 1, dim) * 0.02)
        self.norms = nn.ModuleList(nn.ModuleList(nn.LayerNorm(dim) for _ in range(3)) for _ in range(n_blocks))
        self.attentions = nn.ModuleList(nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True)
                                                      for _ in range(3)) for _ in range(n_blocks))
        self.logits = nn.ModuleList(logit_head(dim) for _ in range(n_blocks))
        # joint: per block, an MLP of each video token and its place's trajectory token
        self.joins = nn.ModuleList(nn.Sequential(nn.Linear(2 * dim, dim), nn.SiLU(), nn.Linear(dim, dim))
                                   for _ in range(n_blocks)) if join else None

    def forward(self, features, maps):
        """features: per block (B, N, dim); maps (B, N, map_dim): the trajectory maps as tokens. Logits (B,)."""
        trajectory = self.trajectory_embed(maps) + self.position
        logit = 0
        for i, block_features in enumerate(features):
            video = self.feature_norm(block_features) + self.position
            if self.joins is not None:
                video = video + self.joins[i](torch.cat([video, trajectory], dim=-1))
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


class TokenClassifier(nn.Module):
    """The earlier classifier: per block an MLP scores every token; a clip's
    logit is the mean over tokens, summed over blocks."""

    def __init__(self, dim, n_blocks):
        super().__init__()
        self.heads = nn.ModuleList(logit_head(dim) for _ in range(n_blocks))

    def forward(self, features, maps=None):
        return sum(head(f).mean(dim=(1, 2)) for head, f in zip(self.heads, features))


class DiffusionDiscriminator(nn.Module):
    """A frozen slow model as the feature backbone and a trainable classifier
    on the features of the chosen blocks (--discriminator: query or tokens)."""

    def __init__(self, slow_generator, slow_adapter, blocks, form="query"):
        super().__init__()
        self.form, self.blocks = form, list(blocks)
        backbone = Controlled(slow_generator, slow_adapter) if form == "tokens" else slow_generator
        self.backbone = backbone.requires_grad_(False).eval()
        cfg = slow_generator.cfg
        if form in ("query", "joint"):
            self.classifier = QueryClassifier(cfg.dim, cfg.heads, slow_generator.grid, trajectory_token_dim(cfg),
                                              len(self.blocks), join=form == "joint")
        else:
            self.classifier = TokenClassifier(cfg.dim, len(self.blocks))

    def forward(self, clip, t, noise, conditions):
        """clip (B, T, C, H, W) is re-noised to time t (B,) and scored: logits (B,)."""
        x_t = add_noise(clip, noise, t)
        if self.form == "tokens":
            _, features = self.backbone(x_t, t, return_features=True, **conditions)
            return self.classifier([features[i] for i in self.blocks])
        # The plain generator reads the clip; the trajectory reaches only the classifier.
        _, features = self.backbone(x_t, t, conditions["first_frame"], return_features=True)
        maps = self.backbone.patchify_pixels(trajectory_channels(conditions["trajectory"], None))  # (B, N, map_dim)
        return self.classifier([features[i] for i in self.blocks], maps.to(features[0].dtype))


def discriminator_loss(logits_real, *logits_fakes):
    """Non-saturating GAN loss of the discriminator; with several groups of
    fakes (GAN-CLS's generated and mismatched), their losses are averaged."""
    return F.softplus(-logits_real).mean() + sum(F.softplus(f).mean() for f in logits_fakes) / len(logits_fakes)


def generator_adversarial_loss(logits_fake):
    """Non-saturating GAN loss of the generator side (here: the adapter)."""
    return F.softplus(-logits_fake).mean()


def disc_time(batch, max_t, generator, device):
    """The discriminator's noise levels: low and middle only. Above t ~ 0.6 the
    noise hides what tells a generated clip from a real one, and the
    classifier learns nothing there."""
    return 0.02 + (max_t - 0.02) * torch.rand(batch, generator=generator, device=device)


def diffusion_weight(loss, step, max_steps, rate=4.0):
    """lambda(step), the diffusion loss's weight beside the adversarial loss.
    The paper's 1 / (4e-3 step + 0.1) ran over ~1K steps; here `step` is
    measured in thousandths of the run: 10 at first, 1 at 22.5% of it, 0.24
    at its end. fixed_lambda: 1 throughout; one loss alone: weight 1."""
    if loss == "hybrid":
        return 1.0 / (rate * step / max_steps + 0.1)
    return 1.0


# ------------------------------------ the adapter's two losses, the classifier's update ---

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


def drifted(trajectory, generator):
    """The maps (B, T, 3, H, W) with the objects drifting off their paths: frame f
    shifted by f * v pixels (zeros shifted in), v a random velocity per clip,
    0.5 to 1 pixel per frame in a random direction. Frame 0 stays and the drift
    is smooth, so neither the first frame nor a jump between map frames gives it
    away: to tell, the classifier must compare the maps with the video."""
    B, T, _, H, W = trajectory.shape
    angle = 2 * torch.pi * torch.rand(B, generator=generator, device=generator.device)
    speed = 0.5 + 0.5 * torch.rand(B, generator=generator, device=generator.device)
    frames = torch.arange(T, device=speed.device)
    shift_x = (frames * (speed * angle.cos())[:, None]).round().int().tolist()  # (B, T) pixels
    shift_y = (frames * (speed * angle.sin())[:, None]).round().int().tolist()
    out = torch.zeros_like(trajectory)
    for b in range(B):
        for f in range(T):
            dx, dy = shift_x[b][f], shift_y[b][f]
            if abs(dx) < W and abs(dy) < H:
                out[b, f, :, max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
                    trajectory[b, f, :, max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
    return out


def discriminator_update(discriminator, optimizer, real, fake, cond, max_t, noise_gen, mismatch=False):
    """One step of the classifier: real clips against generated ones, re-noised alike,
    in one forward (DDP wants one per backward). With mismatch, real clips with
    drifted maps count as fake too (the matching-aware loss of text-to-image
    GANs, GAN-CLS): a classifier that only ever sees maps that fit ignores
    them, and then its loss rewards sharpness but not following the maps.
    Returns (loss, accuracy on real and generated, accuracy on drifted or None)."""
    t = disc_time(len(real), max_t, noise_gen, real.device)
    noise = torch.randn(real.shape, generator=noise_gen, device=real.device)
    groups = [(real, cond), (fake, cond)]
    if mismatch:
        groups.append((real, dict(cond, trajectory=drifted(cond["trajectory"], noise_gen))))
    conds = {key: torch.cat([c[key] for _, c in groups]) for key in cond}
    with autocast(real.device):
        logits = discriminator(torch.cat([clip for clip, _ in groups]), torch.cat([t] * len(groups)),
                               torch.cat([noise] * len(groups)), conds)
    logits_real, logits_fake, *logits_drifted = logits.float().chunk(len(groups))
    loss = discriminator_loss(logits_real, logits_fake, *logits_drifted)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    accuracy = ((logits_real > 0).float().mean() + (logits_fake < 0).float().mean()).item() / 2
    return loss.item(), accuracy, (logits_drifted[0] < 0).float().mean().item() if mismatch else None


def take_gradients(module):
    """The module's gradients (a list, one per parameter), taken out of it."""
    gradients = [torch.zeros_like(p) if p.grad is None else p.grad for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return gradients


def mix_gradients(adapter, gradients, weight, balance):
    """Set the adapter's gradient to  lambda * diffusion + s * adversarial.

    The paper's lambda says which loss leads, on its losses' scales. Ours
    differ: the adversarial gradient is 3 to 100 times the diffusion one
    (docs/results.md, stage 3), so as written the adversarial loss would
    lead after the first few percent of the run. With balance, s scales the
    adversarial gradient to the diffusion gradient's norm (VQGAN's adaptive
    weight, over all the adapter's parameters), and lambda = 10 -> 0.24
    hands over as intended.
    Without (or with one loss alone), s = 1. Returns s."""
    diffusion, adversarial = gradients.get("diffusion"), gradients.get("adversarial")
    scale = 1.0
    if balance and diffusion is not None and adversarial is not None:
        norm = lambda grads: torch.sqrt(sum((g.float() ** 2).sum() for g in grads))
        scale = (norm(diffusion) / (norm(adversarial) + 1e-12)).item()
    for i, parameter in enumerate(adapter.parameters()):
        parameter.grad = sum(w * g[i] for w, g in ((weight, diffusion), (scale, adversarial)) if g is not None)
    return scale


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
    require_one_of(opt, "discriminator", DISCRIMINATORS)
    require_at_least(opt, ("batch_size", "max_steps", "ckpt_interval", "disc_steps", "eval_scenes"))
    if not 0.02 < opt.disc_max_t <= 1:
        raise UserError(f"--disc_max_t must be in (0.02, 1], got {opt.disc_max_t}")
    disc_blocks = index_list(opt, "disc_blocks", CONFIGS[opt.config].depth, "blocks")
    diffusion_steps = set(index_list(opt, "diffusion_steps", len(FAST_TIMES), "steps"))
    opt.fast_generator_ckpt = opt.fast_generator_ckpt or f"checkpoints/fast_generator_{opt.config}.pt"
    opt.slow_generator_ckpt = opt.slow_generator_ckpt or f"checkpoints/slow_generator_{opt.config}.pt"
    opt.adapter_ckpt = opt.adapter_ckpt or f"checkpoints/slow_adapter_controlnet_mask_{opt.config}.pt"
    opt.out_dir = opt.out_dir or f"runs/fast_adapter_{opt.loss}_{opt.config}"
    use_diffusion, use_adversarial = opt.loss != "adversarial", opt.loss != "diffusion"
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
    discriminator = DiffusionDiscriminator(slow_generator, slow_adapter.requires_grad_(False), disc_blocks,
                                           opt.discriminator).to(device)
    opt_adapter = torch.optim.AdamW(adapter.parameters(), lr=opt.lr, betas=(0.0, 0.99), weight_decay=0.0)
    opt_disc = torch.optim.AdamW(discriminator.classifier.parameters(), lr=opt.lr_disc, betas=(0.0, 0.99),
                                 weight_decay=0.0)
    saved_mismatch = run.saved is not None and run.saved.get("mismatch", False)
    if run.saved is not None and (run.saved["parent"] != fast_ckpt["run_id"] or run.saved["loss"] != opt.loss or
                                  run.saved["discriminator"] != opt.discriminator or saved_mismatch != opt.mismatch):
        raise UserError(f"{run.path} is a '{run.saved['loss']}' adapter of fast generator run "
                        f"{run.saved['parent']} with a '{run.saved['discriminator']}' discriminator "
                        f"(--mismatch={saved_mismatch}); this run asks for '{opt.loss}' on run "
                        f"{fast_ckpt['run_id']} with '{opt.discriminator}' (--mismatch={opt.mismatch})")
    run.restore(model=adapter, ema=ema_adapter, disc_classifier=discriminator.classifier, opt_adapter=opt_adapter,
                opt_disc=opt_disc)
    if run.master:
        print(f"stage 3, loss '{opt.loss}': {adapter.config()} adapter reading {adapter.condition} maps on the "
              f"fast generator {opt.fast_generator_ckpt}, '{opt.discriminator}' discriminator on blocks "
              f"{disc_blocks}, device {device}, {run.world_size} rank(s), "
              f"step {run.step}/{opt.max_steps}")
    controlled = Controlled(fast_generator, adapter)
    train_model = run.wrap(controlled)
    ema_model = Controlled(fast_generator, ema_adapter)
    train_disc = run.wrap(discriminator)  # only its classifier trains (the backbone is frozen)
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

    def map_gap():
        """How much the classifier reads the maps: its mean logit on held-out real
        clips under their own maps minus under another scene's. Near 0 it
        ignores them, and its loss can reward sharpness but not following them."""
        clips = fast_generator.encode(scenes["video"].to(device))
        cond = dict(first_frame=clips[:, 0], trajectory=controlled.trajectory(scenes).to(device))
        generator = torch.Generator(device=device).manual_seed(0)
        t = disc_time(len(clips), opt.disc_max_t, generator, device)
        noise = torch.randn(clips.shape, generator=generator, device=device)
        with torch.no_grad(), autocast(device):
            own = discriminator(clips, t, noise, cond)
            other = discriminator(clips, t, noise, dict(cond, trajectory=cond["trajectory"].roll(1, dims=0)))
        return (own - other).float().mean().item()

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
        weight = diffusion_weight(opt.loss, step, opt.max_steps, opt.lambda_rate)
        record = {"k": k, "lambda": round(weight, 4)}
        # Each loss has its own forward and backward (as DDP wants); their gradients are kept apart and mixed.
        gradients = {}
        if use_diffusion and k in diffusion_steps:
            diffusion = diffusion_loss(train_model, video, times, k, cond, noise_gen)
            diffusion.backward()
            gradients["diffusion"] = take_gradients(adapter)
            record["diffusion"] = round(diffusion.item(), 5)
        if use_adversarial:
            adversarial, fake = adversarial_loss(train_model, discriminator, video, times, k, cond, opt.disc_max_t,
                                                 noise_gen)
            adversarial.backward()
            discriminator.classifier.zero_grad(set_to_none=True)  # the adapter's loss must not train the classifier
            gradients["adversarial"] = take_gradients(adapter)
            record["adversarial"] = round(adversarial.item(), 5)
        record["adversarial_scale"] = round(mix_gradients(adapter, gradients, weight, opt.balance), 5)
        record["adapter_grad_norm"] = round(torch.nn.utils.clip_grad_norm_(adapter.parameters(),
                                                                           opt.grad_clip).item(), 5)
        opt_adapter.step()
        opt_adapter.zero_grad(set_to_none=True)
        ema_update(ema_adapter, adapter, ema_decay_at(step, opt.ema_decay))

        if use_adversarial:  # the classifier learns from the same generated clips
            set_lr(opt_disc, lr_at(step, opt.lr_disc, opt.warmup, opt.max_steps))
            for _ in range(opt.disc_steps):
                disc_loss, accuracy, drifted_accuracy = discriminator_update(
                    train_disc, opt_disc, video, fake, cond, opt.disc_max_t, noise_gen, opt.mismatch)
            record.update(disc=round(disc_loss, 5), d_accuracy=round(accuracy, 3))
            if opt.mismatch:
                record["d_drifted_accuracy"] = round(drifted_accuracy, 3)

        if run.due(opt.ckpt_interval):
            run.save(adapter, parent=fast_ckpt["run_id"], parent_path=opt.fast_generator_ckpt,
                     adapter_parent=adapter_ckpt["run_id"], loss=opt.loss, discriminator=opt.discriminator,
                     mismatch=opt.mismatch,
                     generator_config=config_dict(fast_generator), adapter_config=adapter.config(),
                     condition=adapter.condition, model=adapter.state_dict(), ema=ema_adapter.state_dict(),
                     disc_classifier=discriminator.classifier.state_dict(), opt_adapter=opt_adapter.state_dict(),
                     opt_disc=opt_disc.state_dict())
        if run.master and run.due(opt.sample_interval):
            record["held_out"] = evaluate()
            line = metrics.versus(record["held_out"]["finetuned"], record["held_out"]["naive"], "naive")
            if use_adversarial:
                record["held_out"]["disc_map_gap"] = round(map_gap(), 4)
                line += f", discriminator map gap {record['held_out']['disc_map_gap']:+.3f}"
            run.write(f"step {run.step}: {line}")
        run.log(record, clips=len(video))


if __name__ == "__main__":
    main(sys.argv[1:])
