"""The LCM baseline: latent consistency distillation of the controlled slow pair into 4 steps.

A consistency model maps every point x_t of one trajectory of the teacher's
ODE to that trajectory's end, the clean clip: f(x_t, t) = x_0. It is
distilled (consistency models, Song et al. 2023; LCM, Luo et al. 2023) by
making f agree at two neighbouring points of the same trajectory:

  teacher       the slow generator steered by its slow adapter (adapter.Controlled),
                frozen, with its trajectory guidance (the teacher FlashBench measures);
  ODE step      x_t -> x_s: one Euler step of the guided teacher, from a time t of
                its own 50-step grid to the next one s (LCM's skipping step: one
                step of the sampling grid, not of a fine training schedule);
  student       a trainable copy of the whole controlled model (generator and
                adapter, as the paper's baselines distil the controlled model);
  target        an EMA of the student (LCM's mu = 0.95), without gradient: the
                consistency loss pulls f_student(x_t, t) to f_target(x_s, s).

f comes from the velocity, f(x, t) = x - t v(x, t) (model.few_step_step), so
f(x, 0) = x: the boundary condition holds by construction (LCM's c_skip and
c_out, for our flow). Sampling is multistep consistency sampling at the fast
generator's 4 times: predict the clean clip, re-noise it to the next time
(model.few_step_sample, DMD's sampler too).

Where DMD (distill.py) matches the teacher's *distribution*, this regresses
onto the teacher's own *trajectories*: where 4 steps cannot follow them, the
regression averages over what it cannot tell apart, and blurs.

    python consistency.py                    # tiny: checkpoints/lcm_joint_mask_tiny.pt's recipe
    python consistency.py --recipe=lab       # docs/course.md, "LCM or DMD?": ten minutes on one thread
    torchrun --nproc_per_node=4 consistency.py --config=small
    python consistency.py --resume=true
"""

import copy
import sys

import torch
import torch.nn.functional as F

import data
import fvd
import metrics
from adapter import Controlled, adapter_from_checkpoint
from common import (Run, UserError, as_user_error, autocast, clipped_step, ema_update, load_checkpoint, lr_at,
                    noise_seed, parse_flags, require_at_least, require_one_of, set_lr)
from model import (CONFIGS, FAST_TIMES, TIME_SHIFT, add_noise, config_dict, few_step_step, guided_velocity,
                   model_from_checkpoint, sampling_times)
from sample import Method, generate_clips
from video import comparison_video, save_video

FLAGS = dict(
    config=("tiny", "micro | tiny | small: must match the teacher"),
    teacher_ckpt=("", "the slow generator; default checkpoints/slow_generator_<config>.pt"),
    adapter_ckpt=("", "its slow adapter; default checkpoints/slow_adapter_controlnet_mask_<config>.pt"),
    out_dir=("", "default runs/lcm_joint_<config>"),
    batch_size=(8, "clips per rank and iteration"),
    max_steps=(1200, "iterations (dmd-joint's)"),
    lr=(5e-5, "learning rate of the student (dmd-joint's generator's)"),
    warmup=(50, "linear warmup iterations"),
    grad_clip=(1.0, "gradient norm clip"),
    target_decay=(0.95, "EMA decay of the target network (LCM's mu), which is also what is exported"),
    guidance=(3.0, "the teacher's trajectory CFG in its ODE step (FlashBench's teacher: 3)"),
    teacher_steps=(50, "the teacher's Euler grid: each ODE step goes from one of its times to the next"),
    fast_shift=(TIME_SHIFT, "timestep shift of the 4-step sampler; saved in the checkpoint, which the sampler reads"),
    ckpt_interval=(50, "checkpoint every this many iterations"),
    sample_interval=(300, "a GIF of held-out scenes, their held-out FID and mask IoU every this many iterations "
                          "(0: never)"),
    eval_scenes=(48, "held-out scenes of that measurement"),
    fid_encoder=("", "FlashBench's feature network for the held-out FID; default "
                     "checkpoints/video_encoder_<config>.pt (no FID where it is missing)"),
    num_workers=(1, "data processes per rank"),
    seed=(0, "seed of data and noise"),
    threads=(0, "CPU threads of this process; 0: every core (PyTorch's default)"),
    compile=(torch.cuda.is_available(), "torch.compile the student (default on CUDA)"),
    stop_at=(0, "stop (with a checkpoint) after this iteration, to resume later; 0: run to max_steps"),
    time_limit=(0.0, "minutes: stop (with a checkpoint) after this long, to resume later; 0: no limit"),
    resume=(False, "continue the run in out_dir"),
    recipe=("", "a named flag set of RECIPES below: lab, the course's 10-minute run (docs/course.md)"),
)
RECIPES = {"small": dict(max_steps=4000),  # --config=small
           # --recipe=lab: docs/course.md, lab 8 (LCM or DMD?): the held-out figures every 50 iterations
           "lab": dict(threads=1, max_steps=200, sample_interval=50, eval_scenes=24, num_workers=0,
                       out_dir="runs/lab_lcm")}


# ------------------------------------------------------------ the networks ---

def networks(opt, device):
    """The frozen teacher (slow generator + slow adapter), the student (a
    trainable copy of it) and the target (a frozen copy, the student's EMA).
    Returns them with the teacher's and the adapter's checkpoints."""
    teacher_ckpt = load_checkpoint(opt.teacher_ckpt, kind="slow_generator")
    slow_generator = model_from_checkpoint(teacher_ckpt).to(device).requires_grad_(False).eval()
    if data.video_shape(slow_generator.cfg) != data.video_shape(opt.config):
        raise UserError(f"{opt.teacher_ckpt} is not a '{opt.config}' generator")
    adapter_ckpt = load_checkpoint(opt.adapter_ckpt, kind="slow_adapter")
    with as_user_error("--adapter_ckpt"):
        slow_adapter = adapter_from_checkpoint(adapter_ckpt, slow_generator, teacher_ckpt).requires_grad_(False)
    teacher = Controlled(slow_generator, slow_adapter.to(device))
    student = copy.deepcopy(teacher).requires_grad_(True).train()
    target = copy.deepcopy(teacher)
    return teacher_ckpt, adapter_ckpt, teacher, student, target


# ---------------------------------------------------- the consistency loss ---

def consistency_loss(student, target, teacher, x0, cond, uncond, grid, guidance, rng):
    """LCM's loss on a batch of clean clips x0 (B, ...): each clip is noised to
    a random time t of the teacher's grid, the guided teacher takes one Euler
    step to the next time s, and the student's clean clip from x_t regresses
    onto the target's from x_s (an MSE, LCM's l2 loss). At the grid's last time
    s = 0, the target is x_s itself (the boundary condition)."""
    index = torch.randint(len(grid) - 1, (len(x0),), generator=rng, device=x0.device)
    t, s = grid[index], grid[index + 1]  # (B,), s < t
    x_t = add_noise(x0, torch.randn(x0.shape, generator=rng, device=x0.device), t)
    with torch.no_grad():
        velocity = guided_velocity(teacher, guidance, cond, uncond)(x_t, t)
        x_s = x_t + (s - t).view(-1, *[1] * (x0.dim() - 1)) * velocity  # the teacher's ODE step
        target_x0 = few_step_step(target, x_s, s, cond)
    student_x0 = few_step_step(student, x_t, t, cond)
    return F.mse_loss(student_x0.float(), target_x0.float())


# ------------------------------------------------------------------ loop ---

def held_out(target, opt, scenes):
    """The target's 4-step clips of the held-out scenes (FlashBench's noise, sample.generate_clips):
    their FID (frames, fvd.held_out_fid) and mean trajectory accuracy."""
    videos, _ = generate_clips(Method("lcm", target, "few-step", 4, opt.fast_shift), scenes)
    return videos, {"fid": fvd.held_out_fid(videos, opt.config, opt.fid_encoder),
                    **metrics.mean_of(metrics.batch_trajectory_accuracy(videos, scenes))}


def summary(figures):
    return f"held-out FID {figures['fid']}, mask IoU {figures['miou']:.3f}, box IoU {figures['box_iou']:.3f} (4 steps)"


def check_flags(opt):
    """Refuse wrong flags, fill in the default paths."""
    require_one_of(opt, "config", CONFIGS)
    require_at_least(opt, ("batch_size", "max_steps", "ckpt_interval", "eval_scenes"))
    require_at_least(opt, ("teacher_steps",), minimum=2)
    if not 0 <= opt.target_decay < 1:
        raise UserError(f"--target_decay must be in [0, 1), got {opt.target_decay}")
    opt.teacher_ckpt = opt.teacher_ckpt or f"checkpoints/slow_generator_{opt.config}.pt"
    opt.adapter_ckpt = opt.adapter_ckpt or f"checkpoints/slow_adapter_controlnet_mask_{opt.config}.pt"
    opt.out_dir = opt.out_dir or f"runs/lcm_joint_{opt.config}"


def main(argv):
    opt = parse_flags(FLAGS, argv, __doc__, RECIPES)
    check_flags(opt)
    run = Run(opt, kind="lcm_joint")
    device = run.device

    teacher_ckpt, adapter_ckpt, teacher, student, target = networks(opt, device)
    optimizer = torch.optim.AdamW(student.parameters(), lr=opt.lr, betas=(0.9, 0.999), weight_decay=0.0)
    if run.saved is not None and run.saved["adapter_parent"] != adapter_ckpt["run_id"]:
        raise UserError(f"{run.path} distils adapter run {run.saved['adapter_parent']}, not {adapter_ckpt['run_id']}")
    run.restore(model=student, ema=target, optimizer=optimizer)
    grid = sampling_times(opt.teacher_steps, device)
    if run.master:
        print(f"LCM of {opt.teacher_ckpt} + {opt.adapter_ckpt}: student "
              f"{sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters, teacher grid of "
              f"{opt.teacher_steps} steps, guidance {opt.guidance}, device {device}, {run.world_size} rank(s), "
              f"iteration {run.step}/{opt.max_steps}")
    train_student = run.wrap(student)

    shape = data.video_shape(opt.config)
    batches = run.batches(data.SpriteWorld(**shape, batch_size=opt.batch_size, seed=opt.seed, rank=run.rank,
                                           start=run.step))
    rng = torch.Generator(device=device)
    scenes = data.SpriteWorld(**shape, batch_size=opt.eval_scenes, seed=data.HELD_OUT_SEED).batch(0)
    teacher_clips = None  # the teacher's 50 steps on the GIF's scenes, made once

    def evaluate():
        nonlocal teacher_clips
        shown = {key: value[:4] for key, value in scenes.items()}
        if teacher_clips is None:
            teacher_clips, _ = generate_clips(Method("teacher", teacher, "euler", opt.teacher_steps), shown,
                                              guidance=opt.guidance)
        videos, figures = held_out(target, opt, scenes)
        save_video(run.sample_path(), comparison_video(shown, [teacher_clips, videos[:4]], range(len(shown["video"])),
                                                       [f"teacher {opt.teacher_steps}", "student 4"]))
        return figures

    def measure_start():  # the student before LCM: the slow pair through the 4-step sampler
        figures = held_out(target, opt, scenes)[1]
        print(f"step 0: {summary(figures)}")
        return {"held_out": figures}
    for step in run.steps("LCM", measure_start if opt.sample_interval else None):
        batch = next(batches)
        x0 = student.encode(batch["video"].to(device))  # (B, *student.space)
        cond = dict(first_frame=x0[:, 0], trajectory=student.trajectory(batch).to(device))
        uncond = {"traj_keep": torch.zeros(len(x0), device=device)}  # guidance drops the trajectory
        rng.manual_seed(noise_seed(opt.seed, run.rank, step))
        set_lr(optimizer, lr_at(step, opt.lr, opt.warmup, opt.max_steps))
        with autocast(device):
            loss = consistency_loss(train_student, target, teacher, x0, cond, uncond, grid, opt.guidance, rng)
        loss.backward()
        record = {"loss": round(loss.item(), 6), "grad_norm": round(clipped_step(optimizer, student, opt.grad_clip), 5)}
        ema_update(target, student, opt.target_decay)

        if run.master and run.due(opt.sample_interval):
            record["held_out"] = evaluate()
            run.write(f"{summary(record['held_out'])}; samples in {run.sample_path()}")
        run.log(record, clips=opt.batch_size)
        if run.due(opt.ckpt_interval):
            run.save(student, parent=teacher_ckpt["run_id"], parent_path=opt.teacher_ckpt,
                     adapter_parent=adapter_ckpt["run_id"], condition=adapter_ckpt["condition"],
                     adapter_config=adapter_ckpt["adapter_config"], model_config=config_dict(student),
                     fast_times=FAST_TIMES, time_shift=opt.fast_shift, model=student.state_dict(),
                     ema=target.state_dict(), optimizer=optimizer.state_dict())
            run.draw_curves()


if __name__ == "__main__":
    main(sys.argv[1:])
