"""Stage 2: DMD distillation of the slow generator into a 4-step fast generator.

Distribution Matching Distillation in the DMD2 form that video distillers
use (CausVid, Self-Forcing). Three networks:

  fast generator  G, initialised from the slow generator, makes a clip in 4
                  steps (model.few_step_sample): predict the clean clip,
                  re-noise it to the next of model.FAST_TIMES, repeat;
  real score      the frozen slow generator with classifier-free guidance:
                  where the data distribution pulls;
  fake score      a trainable copy, fitted with the flow-matching loss to
                  G's own outputs (the critic): where G's distribution is now.

G's clip moves along (fake - real): away from its own distribution and
towards the teacher's. The fake score is updated every iteration, G every
`ratio` iterations (the two time-scale rule), so the fake score keeps up.
"The generator" may be a controlled one, the slow generator steered by its
slow adapter (adapter.Controlled): DMD of it is the dmd-joint baseline, "DMD
applied to the controlled model" (--recipe=dmd_joint).

    python distill.py                                  # tiny: checkpoints/fast_generator_tiny.pt's recipe
    python distill.py --recipe=dmd_joint               # dmd-joint on the mask adapter
    torchrun --nproc_per_node=4 distill.py --config=small --teacher_ckpt=runs/slow_generator_small/ckpt.pt
    python distill.py --resume=true
"""

import copy
import sys

import torch
import torch.nn.functional as F

import data
import fvd
from adapter import Controlled, adapter_from_checkpoint
from common import (Run, UserError, as_user_error, autocast, clipped_step, ema_decay_at, ema_update, load_checkpoint,
                    lr_at, noise_seed, parse_flags, require_at_least, require_one_of, set_lr)
from model import (CONFIGS, FAST_TIMES, TIME_SHIFT, add_noise, clean_estimate, config_dict, encode_first_frame,
                   fast_generate, fast_times, few_step_sample, few_step_step, flow_matching_loss, generate,
                   guided_velocity, model_from_checkpoint, pick_step, sample_training_time)
from video import comparison_video, save_video

FLAGS = dict(
    config=("tiny", "micro | tiny | small: must match the teacher"),
    teacher_ckpt=("", "the slow generator; default checkpoints/slow_generator_<config>.pt"),
    controlled=(False, "distil the slow generator steered by its slow adapter (--adapter_ckpt): dmd-joint"),
    adapter_ckpt=("", "with --controlled: default checkpoints/slow_adapter_controlnet_mask_<config>.pt"),
    out_dir=("", "default runs/fast_generator_<config> (runs/dmd_joint_<config>)"),
    batch_size=(8, "clips per rank and iteration"),
    max_steps=(4000, "iterations (the paper's ~4K schedule); one fake-score update each"),
    # tiny's fast generator stops at 1000, where it equals the slow one; more DMD makes it rougher (docs/results.md)
    stop_at=(1000, "stop (with a checkpoint) after this iteration, to resume later; 0: run to max_steps"),
    time_limit=(0.0, "minutes: stop (with a checkpoint) after this long, to resume later; 0: no limit"),
    ratio=(5, "fake-score updates per generator update (two time-scale rule)"),
    lr_generator=(5e-5, "learning rate of the fast generator"),
    lr_fake=(1e-4, "learning rate of the fake score"),
    warmup=(50, "linear warmup iterations"),
    grad_clip=(1.0, "gradient norm clip"),
    ema_decay=(0.99, "EMA of the fast generator, what is exported"),
    guidance=(1.0, "real-score CFG, uncond + w (cond - uncond), on the first frame (dmd-joint: on the "
                   "trajectory); the Turbo config's cond + 6 (cond - uncond) is w = 7"),
    fast_shift=(TIME_SHIFT, "timestep shift of the 4-step sampler's times; saved in the checkpoint, which every "
                            "4-step sampler reads"),
    t_min=(0.02, "DMD re-noises at shifted uniform t clamped to [t_min, t_max]"),
    t_max=(0.98, "see t_min"),
    ckpt_interval=(50, "checkpoint every this many iterations"),
    sample_interval=(300, "a GIF of held-out scenes and the held-out FID every this many iterations (0: never)"),
    fid_encoder=("", "FlashBench's feature network for the held-out FID; default "
                     "checkpoints/video_encoder_<config>.pt (no FID where it is missing)"),
    num_workers=(1, "data processes per rank"),
    seed=(0, "seed of data and noise"),
    threads=(0, "CPU threads of this process; 0: every core (PyTorch's default)"),
    compile=(torch.cuda.is_available(), "torch.compile the trained networks (default on CUDA)"),
    resume=(False, "continue the run in out_dir"),
    recipe=("", "a named flag set of RECIPES below: lab, the course's 10-minute run (docs/course.md)"),
)
RECIPES = {"small": dict(stop_at=0),  # --config=small
           # --recipe=lab: docs/course.md, lab 4: 300 iterations, the held-out FID every 100 (< 7 minutes, one thread)
           "lab": dict(threads=1, max_steps=300, stop_at=0, sample_interval=100, num_workers=0,
                       out_dir="runs/lab_fast_generator"),
           # --recipe=dmd_joint: the paper's DMD baseline, the controlled model distilled whole
           "dmd_joint": dict(controlled=True, max_steps=1200, stop_at=0)}


# ------------------------------------------------------ the score networks ---

def score_networks(opt, device):
    """The real score: the frozen teacher, the slow generator (steered by its
    slow adapter with --controlled; guidance then acts on the trajectory). The
    fast generator G and the fake score: trainable copies of it. Returns them
    with the teacher's and the adapter's checkpoints (None without an adapter)."""
    teacher = load_checkpoint(opt.teacher_ckpt, kind="slow_generator")
    slow_generator = model_from_checkpoint(teacher).to(device).requires_grad_(False).eval()
    if data.video_shape(slow_generator.cfg) != data.video_shape(opt.config):
        raise UserError(f"{opt.teacher_ckpt} is not a '{opt.config}' generator")
    real_score, adapter_ckpt = slow_generator, None
    if opt.controlled:
        adapter_ckpt = load_checkpoint(opt.adapter_ckpt, kind="slow_adapter")
        with as_user_error("--adapter_ckpt"):
            slow_adapter = adapter_from_checkpoint(adapter_ckpt, slow_generator, teacher).requires_grad_(False)
        real_score = Controlled(slow_generator, slow_adapter.to(device))
    fast_generator = copy.deepcopy(real_score).requires_grad_(True).train()
    fake_score = copy.deepcopy(real_score).requires_grad_(True).train()
    return teacher, adapter_ckpt, real_score, fast_generator, fake_score


# ----------------------------------------------------------- the DMD loss ---

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


# ----------------------------------------------------- the two updates -----

def generator_update(fast_generator, fake_score, real_score, x_k, t_k, cond, uncond, opt, rng):
    """G's loss at step k of its sampler: its clean clip from x_k, re-noised
    to a random t, read by both scores. Returns (loss, the clip detached)."""
    device = x_k.device
    with autocast(device):
        generated = few_step_step(fast_generator, x_k, t_k, cond)  # (B, T, C, H, W), with grad
    with torch.no_grad(), autocast(device):
        t = sample_training_time(len(x_k), rng, device).clamp(opt.t_min, opt.t_max)
        x_t = add_noise(generated.detach(), torch.randn(generated.shape, generator=rng, device=device), t)
        fake_x0 = clean_estimate(x_t, fake_score(x_t, t, **cond), t)
        real_x0 = clean_estimate(x_t, guided_velocity(real_score, opt.guidance, cond, uncond)(x_t, t), t)
    return dmd_loss(generated, fake_x0, real_x0), generated.detach()


def critic_loss(fake_score, clip, cond, rng):
    """The fake score's update: flow matching on G's clips, so that it tracks
    G's current distribution."""
    with autocast(clip.device):
        return flow_matching_loss(fake_score, clip.float(), cond["first_frame"], rng,
                                  **{key: value for key, value in cond.items() if key != "first_frame"})


# ------------------------------------------------------------------ loop ---

def conditions_of(batch, real_score, device):
    """The scores' keyword arguments, and what guidance drops: the first
    frame, or (a controlled generator) the trajectory in the maps its adapter reads."""
    first = encode_first_frame(real_score, batch["video"][:, 0].to(device))
    if not isinstance(real_score, Controlled):
        return dict(first_frame=first), {"first_frame": None}
    return (dict(first_frame=first, trajectory=real_score.trajectory(batch).to(device)),
            {"traj_keep": torch.zeros(len(first), device=device)})


def write_samples(real_score, ema_generator, opt, run):
    """Held-out scenes: truth | teacher, 50 steps | teacher, 4 steps | fast generator (EMA), 4 steps."""
    device = run.device
    scenes = data.SpriteWorld(**data.video_shape(opt.config), batch_size=4, seed=data.HELD_OUT_SEED).batch(0)
    first = scenes["video"][:, 0].to(device)  # the samplers take pixels
    cond = {key: value for key, value in conditions_of(scenes, real_score, device)[0].items() if key != "first_frame"}
    seed = lambda: torch.Generator(device=device).manual_seed(0)
    with autocast(device):
        clips = [generate(real_score, first, steps=50, rng=seed(), **cond),
                 generate(real_score, first, steps=4, rng=seed(), **cond),
                 fast_generate(ema_generator, first, opt.fast_shift, rng=seed(), **cond)]
    path = run.sample_path()
    save_video(path, comparison_video(scenes, [clip.float().cpu() for clip in clips], range(4),
                                         ["teacher 50", "teacher 4", "student 4"]))
    return path


@torch.no_grad()
def held_out_fid(ema_generator, opt, device, n_scenes=48):
    """FID of the fast generator's own 4-step clips (no trajectory) on held-out
    scenes (fvd.held_out_fid): the few-step gap DMD closes. On tiny the
    student starts at 29.2 (the slow generator through the same sampler) and
    the shipped fast generator scores 21.5 (docs/results.md, stage 2 in ten
    minutes)."""
    scenes = data.SpriteWorld(**data.video_shape(opt.config), batch_size=n_scenes, seed=data.HELD_OUT_SEED).batch(0)
    with autocast(device):
        clips = fast_generate(ema_generator, scenes["video"][:, 0].to(device), opt.fast_shift,
                              rng=torch.Generator(device=device).manual_seed(0))
    return fvd.held_out_fid(clips, opt.config, opt.fid_encoder)


def check_flags(opt):
    """Refuse wrong flags, fill in the default paths; returns the kind of checkpoint the run writes."""
    require_one_of(opt, "config", CONFIGS)
    require_at_least(opt, ("batch_size", "max_steps", "ratio", "ckpt_interval"))
    if not 0 < opt.t_min < opt.t_max < 1:
        raise UserError("need 0 < --t_min < --t_max < 1")
    opt.teacher_ckpt = opt.teacher_ckpt or f"checkpoints/slow_generator_{opt.config}.pt"
    kind, adapter = ("dmd_joint", f"checkpoints/slow_adapter_controlnet_mask_{opt.config}.pt") if opt.controlled else \
        ("fast_generator", "")
    opt.adapter_ckpt = opt.adapter_ckpt or adapter
    opt.out_dir = opt.out_dir or f"runs/{kind}_{opt.config}"
    return kind


def main(argv):
    opt = parse_flags(FLAGS, argv, __doc__, RECIPES)
    kind = check_flags(opt)
    run = Run(opt, kind=kind)
    device = run.device

    teacher, adapter_ckpt, real_score, fast_generator, fake_score = score_networks(opt, device)
    # What a dmd-joint checkpoint records of its adapter, as a fast adapter's does (None for the plain generator).
    adapter_lineage = dict(adapter_parent=adapter_ckpt and adapter_ckpt["run_id"],
                           condition=adapter_ckpt and adapter_ckpt["condition"],
                           adapter_config=adapter_ckpt and adapter_ckpt["adapter_config"])
    ema_generator = copy.deepcopy(fast_generator).requires_grad_(False).eval()
    optimizer_generator = torch.optim.AdamW(fast_generator.parameters(), lr=opt.lr_generator, betas=(0.0, 0.999),
                                            weight_decay=0.0)
    optimizer_fake = torch.optim.AdamW(fake_score.parameters(), lr=opt.lr_fake, betas=(0.0, 0.999), weight_decay=0.0)
    if run.saved is not None and run.saved["parent"] != teacher["run_id"]:
        raise UserError(f"{run.path} distils generator run {run.saved['parent']}, not {teacher['run_id']}")
    run.restore(model=fast_generator, ema=ema_generator, fake_score=fake_score,
                optimizer_generator=optimizer_generator, optimizer_fake=optimizer_fake)
    times = fast_times(opt.fast_shift, device)
    if run.master:
        print(f"DMD ({kind}) of {opt.teacher_ckpt}: generator and "
              f"fake score {sum(p.numel() for p in fast_generator.parameters()) / 1e6:.2f}M parameters each, "
              f"4 steps at t = {[round(t, 3) for t in times.tolist()]}, guidance {opt.guidance}, device {device}, "
              f"{run.world_size} rank(s), iteration {run.step}/{opt.max_steps}")
    train_generator, train_fake = run.wrap(fast_generator), run.wrap(fake_score)

    batches = run.batches(data.SpriteWorld(**data.video_shape(opt.config), batch_size=opt.batch_size, seed=opt.seed,
                                           rank=run.rank, start=run.step))
    rng = torch.Generator(device=device)

    def measure_start():  # the student before DMD: the teacher through the 4-step sampler
        fid = held_out_fid(ema_generator, opt, device)
        print(f"step 0: held-out FID {fid} (4 steps, no trajectory)")
        return {"held_out": {"fid": fid}}
    for step in run.steps("stage 2 DMD", measure_start if opt.sample_interval else None):
        batch = next(batches)
        cond, uncond = conditions_of(batch, real_score, device)
        rng.manual_seed(noise_seed(opt.seed, run.rank, step))
        record = {}

        # G's input by backward simulation: from pure noise, run G itself (no grad) for k steps.
        k = pick_step(opt.seed, step, len(times))
        noise = torch.randn((len(batch["video"]), *real_score.space), generator=rng, device=device)
        with torch.no_grad(), autocast(device):
            x_k = few_step_sample(fast_generator, noise, times, cond, rng, stop_after=k)

        if step % opt.ratio == 0:  # the generator update, every `ratio` iterations
            set_lr(optimizer_generator, lr_at(step // opt.ratio, opt.lr_generator, opt.warmup // opt.ratio,
                                              opt.max_steps // opt.ratio))
            loss, clip = generator_update(train_generator, fake_score, real_score, x_k, times[k], cond, uncond,
                                          opt, rng)
            loss.backward()
            record["generator_grad_norm"] = clipped_step(optimizer_generator, fast_generator, opt.grad_clip)
            ema_update(ema_generator, fast_generator, ema_decay_at(step, opt.ema_decay))
        else:
            with torch.no_grad(), autocast(device):
                clip = few_step_step(fast_generator, x_k, times[k], cond)

        set_lr(optimizer_fake, lr_at(step, opt.lr_fake, opt.warmup, opt.max_steps))  # the critic, every iteration
        loss_fake = critic_loss(train_fake, clip, cond, rng)
        loss_fake.backward()
        clipped_step(optimizer_fake, fake_score, opt.grad_clip)

        record["fake_loss"] = round(loss_fake.item(), 5)
        if run.master and run.due(opt.sample_interval):
            record["held_out"] = {"fid": held_out_fid(ema_generator, opt, device)}
            run.write(f"held-out FID {record['held_out']['fid']} (4 steps, no trajectory); "
                      f"samples in {write_samples(real_score, ema_generator, opt, run)}")
        run.log(record, clips=opt.batch_size)
        if run.due(opt.ckpt_interval):
            run.save(fast_generator, parent=teacher["run_id"], parent_path=opt.teacher_ckpt, **adapter_lineage,
                     model_config=config_dict(fast_generator), fast_times=FAST_TIMES, time_shift=opt.fast_shift,
                     model=fast_generator.state_dict(), ema=ema_generator.state_dict(),
                     fake_score=fake_score.state_dict(), optimizer_generator=optimizer_generator.state_dict(),
                     optimizer_fake=optimizer_fake.state_dict())
            run.draw_curves()


if __name__ == "__main__":
    main(sys.argv[1:])
