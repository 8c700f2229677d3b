"""Stage 0a: train the video autoencoder (autoencoder.py) whose latent the
slow generator denoises.

Objects are a few percent of the pixels, and a plain L1/MSE loss lets them
fade into the background; so object pixels weigh `object_weight` times as
much, and an edge term compares neighbouring-pixel differences so that the
decoder keeps shapes sharp. Noise on the latent during training keeps it
smooth (a small change of latent, a small change of frame), which a
diffusion model on top of it needs. Held-out reconstructions are measured
with FlashBench's instruments (mask IoU, FID, FVD). The latent DiT won the
stage-0 A/B against a pixel DiT (docs/results.md).

    python train_autoencoder.py                  # tiny: 2x down, 4 channels (checkpoints/autoencoder_tiny.pt)
    python train_autoencoder.py --config=small
    python train_autoencoder.py --resume=true --export=checkpoints/autoencoder_tiny.pt
"""

import sys

import torch

import data
import fvd
import metrics
from autoencoder import FrameAutoencoder
from common import (Run, UserError, check_new_file, export_checkpoint, lr_at, parse_flags, require_at_least,
                    require_one_of, set_lr)
from model import CLIP_SHAPES


def reconstruction_loss(reconstruction, batch, object_weight, edge_weight):
    """L1 with object pixels weighted `object_weight` times, plus the L1 of the
    horizontal and vertical neighbour differences (the edges)."""
    video = batch["video"]
    on_object = batch["masks"].any(1)[:, :, None].float()  # (B, T, 1, H, W)
    weight = 1 + (object_weight - 1) * on_object
    pixel = (weight * (reconstruction - video).abs()).mean()
    dx = lambda x: x[..., :, 1:] - x[..., :, :-1]
    dy = lambda x: x[..., 1:, :] - x[..., :-1, :]
    edge = (dx(reconstruction) - dx(video)).abs().mean() + (dy(reconstruction) - dy(video)).abs().mean()
    return pixel + edge_weight * edge


@torch.no_grad()
def held_out(autoencoder, batch, encoder, references):
    """Reconstructions of held-out real clips, measured as FlashBench measures
    a method: mask IoU, box IoU, FID, FVD, PSNR."""
    autoencoder.eval()
    reconstruction = autoencoder.decode(autoencoder.encode(batch["video"])).clamp(-1, 1)
    autoencoder.train()
    accuracy = metrics.mean_of(metrics.batch_trajectory_accuracy(reconstruction, batch))
    frames, clips = fvd.embed(encoder, reconstruction)
    frame_reference, clip_reference = references
    return {"miou": round(accuracy["miou"], 4), "box_iou": round(accuracy["box_iou"], 4),
            "fid": round(frame_reference.distance(frames.flatten(0, 1)), 3),
            "fvd": round(clip_reference.distance(clips), 4),
            "psnr": round(metrics.psnr(reconstruction, batch["video"]), 2)}


@torch.no_grad()
def latent_statistics(autoencoder, config, clips, seed):
    """Per-channel mean and standard deviation of the latents of fresh real clips."""
    stream = data.SpriteWorld(**data.video_shape(config), batch_size=min(32, clips), seed=seed)
    latents = torch.cat([autoencoder.encode(stream.batch(i)["video"]) for i in range(max(1, clips // 32))])
    return latents.mean((0, 1, 3, 4)), latents.std((0, 1, 3, 4))


FLAGS = dict(
    config=("tiny", "micro | tiny | small: the clips' shape"),
    out_dir=("", "default runs/autoencoder_<config>"),
    export=("", "when done, copy the weights (no optimizer) to this file, never over an existing one; empty: do not"),
    down=(2, "spatial down-sampling, a power of two"),
    channels=(4, "latent channels"),
    width=(32, "channels of the first conv"),
    batch_size=(4, "clips per step (all their frames)"),
    max_steps=(6000, "training steps"),
    stop_at=(0, "stop (with a checkpoint) after this step, to resume later; 0: run to max_steps"),
    lr=(2e-3, "peak learning rate"),
    warmup=(50, "linear warmup steps"),
    object_weight=(5.0, "weight of object pixels in the L1 loss"),
    edge_weight=(1.0, "weight of the edge (neighbour difference) term"),
    latent_noise=(0.1, "noise on the latent in training, times its standard deviation"),
    eval_interval=(250, "measure held-out reconstructions every this many steps"),
    ckpt_interval=(250, "checkpoint every this many steps"),
    features=("checkpoints/video_encoder_<config>.pt", "FlashBench's feature network, for FID and FVD"),
    num_workers=(1, "data processes rendering clips"),
    seed=(0, "seed of weights and data"),
    threads=(0, "CPU threads of this process; 0: every core (PyTorch's default)"),
    compile=(False, "torch.compile the autoencoder"),
    resume=(False, "continue the run in out_dir"),
)

RECIPES = {"small": dict(max_steps=12000)}  # --config=small


def main(argv):
    opt = parse_flags(FLAGS, argv, __doc__, RECIPES)
    require_one_of(opt, "config", CLIP_SHAPES)
    require_at_least(opt, ("batch_size", "max_steps", "ckpt_interval", "eval_interval", "channels"))
    require_at_least(opt, ("width",), 8)  # GroupNorm(8)
    shape = data.video_shape(opt.config)
    if opt.down not in (1, 2, 4, 8):
        raise UserError(f"--down must be 1, 2, 4 or 8, got {opt.down}")
    opt.out_dir = opt.out_dir or f"runs/autoencoder_{opt.config}"
    if opt.export:
        check_new_file(opt.export)  # refused now, not after the training
    encoder, *references = fvd.load_encoder(opt.features.replace("<config>", opt.config))
    run = Run(opt, kind="autoencoder")

    autoencoder = FrameAutoencoder(opt.down, opt.channels, opt.width).to(run.device)
    optimizer = torch.optim.AdamW(autoencoder.parameters(), lr=opt.lr, weight_decay=0.0)
    run.restore(autoencoder=autoencoder, optimizer=optimizer)
    print(f"frame autoencoder: {sum(p.numel() for p in autoencoder.parameters()) / 1e6:.2f}M parameters, "
          f"{opt.down}x down to {opt.channels} channels, step {run.step}/{opt.max_steps}")
    train_autoencoder = run.wrap(autoencoder)
    held_out_batch = data.SpriteWorld(**shape, batch_size=64, seed=data.HELD_OUT_SEED + 7).batch(0)

    def save(**extra):
        run.save(autoencoder, config=autoencoder.config(), autoencoder=autoencoder.state_dict(),
                 optimizer=optimizer.state_dict(), **extra)

    batches = run.batches(data.SpriteWorld(**shape, batch_size=opt.batch_size, seed=opt.seed + 13, start=run.step))
    for step in run.steps("autoencoder"):
        set_lr(optimizer, lr_at(step, opt.lr, opt.warmup, opt.max_steps))
        batch = {key: value.to(run.device) for key, value in next(batches).items()}
        reconstruction, _ = train_autoencoder(batch["video"], opt.latent_noise)
        loss = reconstruction_loss(reconstruction, batch, opt.object_weight, opt.edge_weight)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"loss": round(loss.item(), 5)}
        if run.due(opt.eval_interval) and run.master:
            record.update(held_out(autoencoder, held_out_batch, encoder, references))
        run.log(record, clips=opt.batch_size)
        if run.due(opt.ckpt_interval):
            save()
            run.draw_curves()
    if run.step < opt.max_steps:  # stopped early: resume later
        return
    mean, std = latent_statistics(autoencoder, opt.config, 256, seed=opt.seed + 31)
    save(latent_mean=mean, latent_std=std)
    if opt.export:
        export_checkpoint(run.path, opt.export)
        print(f"exported to {opt.export}")


if __name__ == "__main__":
    main(sys.argv[1:])
