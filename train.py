"""Stage 0: pretrain the slow generator, an image-to-video DiT (model.py)
trained with flow matching on the sprite world (or on a folder of your own clips).

    python train.py                                   # tiny: checkpoints/slow_generator_tiny.pt's recipe
    python train.py --config=small                    # one GPU
    torchrun --nproc_per_node=4 train.py --config=small
    python train.py --resume=true                     # continue exactly where it stopped

The checkpoint `out_dir/ckpt.pt` is written atomically every `ckpt_interval`
steps and holds everything needed to continue bit-for-bit: weights, EMA,
optimizer, step. The data and the noise of step s are pure functions of
(seed, rank, s), so they need no state.
"""

import contextlib
import copy
import sys

import torch

import data
import fvd
from common import (Run, UserError, autocast, clipped_step, ema_decay_at, ema_update, load_checkpoint, lr_at,
                    noise_seed, parse_flags, require_at_least, require_one_of, set_lr)
from model import CONFIGS, attach_autoencoder, build_model, config_dict, flow_matching_loss, generate
from scenes import ClipFolder
from video import comparison_video, save_video

FLAGS = dict(
    config=("tiny", "micro | tiny | small: video shape and model size (model.CONFIGS)"),
    autoencoder=("checkpoints/autoencoder_<config>.pt", "the frozen autoencoder of a latent config (autoencoder.py)"),
    out_dir=("", "default runs/slow_generator_<config>"),
    data_dir=("", "a folder of your own clips (scenes.ClipFolder); empty: the sprite world"),
    objects=(0, "objects in each sprite-world clip; 0: 1 to 6 at random (the world every stage trains on)"),
    batch_size=(128, "clips per rank and micro-step"),
    grad_accum=(1, "micro-steps per optimizer step"),
    max_steps=(4800, "length of the lr schedule"),
    # The shipped tiny run stopped at its 4-minute time limit at step 3977; this replays it.
    stop_at=(3977, "stop (with a checkpoint) after this step, to resume later; 0: run to max_steps"),
    time_limit=(0.0, "minutes: stop (with a checkpoint) after this long, to resume later; 0: no limit"),
    lr=(8e-4, "peak learning rate"),
    warmup=(200, "linear warmup steps"),
    weight_decay=(0.01, "AdamW weight decay"),
    grad_clip=(1.0, "gradient norm clip"),
    ema_decay=(0.999, "EMA of the weights, what is exported"),
    cond_drop_prob=(0.1, "first frame dropped this often, for classifier-free guidance"),
    ckpt_interval=(250, "checkpoint every this many steps"),
    sample_interval=(1000, "a GIF of held-out scenes and their FID every this many steps (0: never)"),
    sample_steps=(50, "Euler steps of the sample GIFs"),
    sample_guidance=(1.0, "first-frame guidance of the sample GIFs"),
    eval_scenes=(32, "held-out scenes generated at each sample_interval: four in the GIF, all in the FID"),
    fid_encoder=("", "FlashBench's feature network for the held-out FID; default checkpoints/video_encoder_<config>.pt "
                     "(no FID where it is missing)"),
    num_workers=(1, "data processes per rank"),
    seed=(0, "seed of weights, data and noise"),
    threads=(0, "CPU threads of this process; 0: every core (PyTorch's default)"),
    compile=(torch.cuda.is_available(), "torch.compile the training model (default on CUDA)"),
    resume=(False, "continue the run in out_dir"),
    recipe=("", "a named flag set of RECIPES below: lab, the course's 10-minute run (docs/course.md)"),
)
RECIPES = {"small": dict(batch_size=64, max_steps=40000, stop_at=0),  # --config=small
           # --recipe=lab: docs/course.md, lab 2: 600 steps of 8 clips from scratch (under 7 minutes, one thread)
           "lab": dict(threads=1, batch_size=8, max_steps=600, stop_at=0, warmup=50, ema_decay=0.99,
                       sample_interval=200, sample_steps=20, num_workers=0, out_dir="runs/lab_slow_generator")}


def slow_generator(opt, run):
    """A fresh DiT of the config, holding the frozen autoencoder where it runs on latents."""
    model = build_model(opt.config)
    if model.cfg.codec == "latent":
        path = opt.autoencoder.replace("<config>", opt.config)
        try:
            attach_autoencoder(model, load_checkpoint(path, kind="autoencoder"))
        except ValueError as e:
            raise UserError(f"--autoencoder {path}: {e}") from None
    if run.saved is not None and run.saved["model_config"] != config_dict(model):
        raise UserError(f"{run.path} was trained with another model config: {run.saved['model_config']}")
    return model.to(run.device)


@torch.no_grad()
def held_out(ema_model, opt, run):
    """The EMA model's clips of held-out scenes of its world: a GIF of four
    (truth | generated, boxes drawn on both) and the FID of all (fvd.held_out_fid),
    which falls as objects appear: 165 untrained, 23.8 the shipped generator (32 scenes, 20 steps)."""
    scenes = data.SpriteWorld(**data.video_shape(opt.config), batch_size=opt.eval_scenes, seed=data.HELD_OUT_SEED,
                              n_objects=opt.objects or None).batch(0)
    with autocast(run.device):
        generated = generate(ema_model, scenes["video"][:, 0].to(run.device), steps=opt.sample_steps,
                             guidance=opt.sample_guidance,
                             rng=torch.Generator(device=run.device).manual_seed(0)).float().cpu()
    path = run.sample_path()
    save_video(path, comparison_video(scenes, [generated], range(min(4, opt.eval_scenes)), ["generated"]))
    return path, fvd.held_out_fid(generated, opt.config, opt.fid_encoder)


def main(argv):
    opt = parse_flags(FLAGS, argv, __doc__, RECIPES)
    require_one_of(opt, "config", CONFIGS)
    require_at_least(opt, ("batch_size", "grad_accum", "max_steps", "ckpt_interval", "eval_scenes"))
    opt.out_dir = opt.out_dir or f"runs/slow_generator_{opt.config}"
    run = Run(opt, kind="slow_generator")
    device = run.device

    model = slow_generator(opt, run)
    ema_model = copy.deepcopy(model).requires_grad_(False).eval()
    trained = [p for p in model.parameters() if p.requires_grad]  # not the frozen autoencoder
    optimizer = torch.optim.AdamW(trained, lr=opt.lr, betas=(0.9, 0.99), weight_decay=opt.weight_decay)
    run.restore(model=model, ema=ema_model, optimizer=optimizer)
    if run.master:
        print(f"slow generator '{opt.config}' ({model.cfg.codec}): "
              f"{sum(p.numel() for p in trained) / 1e6:.2f}M trained parameters, "
              f"tokens {model.grid}, device {device}, {run.world_size} rank(s), step {run.step}/{opt.max_steps}")
    train_model = run.wrap(model)

    shape = data.video_shape(opt.config)
    # Resuming at step s starts the stream at micro-batch s * grad_accum.
    stream_args = dict(batch_size=opt.batch_size, seed=opt.seed, rank=run.rank, start=run.step * opt.grad_accum)
    batches = run.batches(ClipFolder(opt.data_dir, **shape, **stream_args) if opt.data_dir
                          else data.SpriteWorld(**shape, **stream_args, n_objects=opt.objects or None))
    rng = torch.Generator(device=device)

    model.train()
    for step in run.steps("stage 0"):
        lr = set_lr(optimizer, lr_at(step, opt.lr, opt.warmup, opt.max_steps))
        loss_sum = 0.0
        for micro in range(opt.grad_accum):
            video = model.encode(next(batches)["video"].to(device, non_blocking=True))  # (B, *model.space)
            rng.manual_seed(noise_seed(opt.seed, run.rank, step * opt.grad_accum + micro))
            # DDP all-reduces gradients only on the last micro-step.
            last = run.world_size == 1 or micro == opt.grad_accum - 1
            with contextlib.nullcontext() if last else train_model.no_sync(), autocast(device):
                loss = flow_matching_loss(train_model, video, video[:, 0], rng, opt.cond_drop_prob)
            (loss / opt.grad_accum).backward()
            loss_sum += loss.item() / opt.grad_accum
        grad_norm = clipped_step(optimizer, model, opt.grad_clip)
        ema_update(ema_model, model, ema_decay_at(step, opt.ema_decay))

        record = {"loss": round(loss_sum, 5), "grad_norm": round(grad_norm, 4), "lr": lr}
        if run.master and run.due(opt.sample_interval):
            path, fid = held_out(ema_model, opt, run)
            record["held_out"] = {"fid": fid}
            measured = "" if fid is None else f"held-out FID {fid} ({opt.sample_steps} steps); "
            run.write(f"{measured}samples in {path}")
        run.log(record, clips=opt.batch_size * opt.grad_accum)
        if run.due(opt.ckpt_interval):
            run.save(model, parent=None, model_config=config_dict(model), model=model.state_dict(),
                     ema=ema_model.state_dict(), optimizer=optimizer.state_dict())
            run.draw_curves()


if __name__ == "__main__":
    main(sys.argv[1:])
