"""Stage 0a: the video autoencoder, pixels to a compact latent and back, as
real video DiTs use (Wan's VAE): the DiT denoises few values per token and
the conv decoder draws the edges. The slow generator (model.py, codec
"latent") holds a frozen copy and every later stage inherits it.

Per frame, a small conv net maps (3, H, W) to (channels, H/down, W/down).
Objects are a few percent of the pixels, and a plain L1/MSE loss lets them
fade into the background; so object pixels weigh `object_weight` times as
much, and an edge term compares neighbouring-pixel differences so that the
decoder keeps shapes sharp. Noise on the latent during training keeps it
smooth (a small change of latent, a small change of frame), which a
diffusion model on top of it needs. The checkpoint stores each latent
channel's mean and standard deviation over real clips; the DiT scales its
latents with them to the spread of pixel clips (model.VideoDiT.encode).

    python autoencoder.py                     # tiny: 2x down, 4 channels
    python autoencoder.py --down=4 --channels=8

Held-out reconstructions are measured with FlashBench's instruments (mask
IoU, FID, FVD). The latent DiT won the stage-0 A/B against the pixel DiT and
a DiT with its own conv stem and head (docs/results.md).
"""

import os
import sys

import torch
import torch.nn as nn
from einops import rearrange

import data
import fvd
import metrics
from common import Run, UserError, export_checkpoint, lr_at, parse_flags, require_at_least, require_one_of, set_lr
from fvd import conv_block
from model import CONFIGS, video_shape


class FrameAutoencoder(nn.Module):
    """Clips (B, T, 3, H, W) in [-1, 1] <-> latents (B, T, channels, H/down, W/down)."""

    def __init__(self, down=2, channels=4, width=32):
        super().__init__()
        self.down, self.channels, self.width = down, channels, width
        stages = down.bit_length() - 1  # stride-2 convs
        widths = [width * 2 ** i for i in range(stages + 1)]
        self.encoder = nn.Sequential(conv_block(3, width), conv_block(width, width),
                                     *[conv_block(widths[i], widths[i + 1], stride=2) for i in range(stages)],
                                     conv_block(widths[-1], widths[-1]), nn.Conv2d(widths[-1], channels, 1))
        self.decoder = nn.Sequential(nn.Conv2d(channels, widths[-1], 1), conv_block(widths[-1], widths[-1]),
                                     *[nn.Sequential(nn.Upsample(scale_factor=2), conv_block(widths[i + 1], widths[i]))
                                       for i in reversed(range(stages))],
                                     conv_block(width, width), nn.Conv2d(width, 3, 3, padding=1))

    def config(self):
        return {"down": self.down, "channels": self.channels, "width": self.width}

    def encode(self, video):
        B = video.shape[0]
        latent = self.encoder(rearrange(video.float(), "b t c h w -> (b t) c h w"))
        return rearrange(latent, "(b t) c h w -> b t c h w", b=B)

    def decode(self, latent):
        B = latent.shape[0]
        frames = self.decoder(rearrange(latent, "b t c h w -> (b t) c h w"))
        return rearrange(frames, "(b t) c h w -> b t c h w", b=B)

    def forward(self, video, latent_noise=0.0):
        latent = self.encode(video)
        noisy = latent + latent_noise * latent.detach().std() * torch.randn_like(latent)
        return self.decode(noisy), latent


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
    stream = data.SpriteWorld(**video_shape(config), batch_size=min(32, clips), seed=seed)
    latents = torch.cat([autoencoder.encode(stream.batch(i)["video"]) for i in range(max(1, clips // 32))])
    return latents.mean((0, 1, 3, 4)), latents.std((0, 1, 3, 4))


FLAGS = dict(
    config=("tiny", "micro | tiny | small: the clips' shape"),
    out_dir=("", "default runs/autoencoder_<config>"),
    export=("", "default checkpoints/autoencoder_<config>.pt (\"none\": do not export)"),
    down=(2, "spatial down-sampling, a power of two"),
    channels=(4, "latent channels"),
    width=(32, "channels of the first conv"),
    batch_size=(4, "clips per step (all their frames)"),
    max_steps=(3000, "training steps"),
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
    compile=(False, "torch.compile the autoencoder"),
    resume=(False, "continue the run in out_dir"),
)


def main(argv):
    opt = parse_flags(FLAGS, argv, __doc__)
    require_one_of(opt, "config", CONFIGS)
    require_at_least(opt, ("batch_size", "max_steps", "ckpt_interval", "eval_interval", "channels"))
    require_at_least(opt, ("width",), 8)  # GroupNorm(8)
    shape = video_shape(opt.config)
    if opt.down not in (1, 2, 4, 8):
        raise UserError(f"--down must be 1, 2, 4 or 8, got {opt.down}")
    opt.out_dir = opt.out_dir or f"runs/autoencoder_{opt.config}"
    opt.export = opt.export or f"checkpoints/autoencoder_{opt.config}.pt"
    features_path = opt.features.replace("<config>", opt.config)
    if not os.path.exists(features_path):
        raise UserError(f"--features: {features_path} is missing: make it with python fvd.py --config={opt.config}")
    encoder, *references = fvd.load_encoder(features_path)
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
        if run.due(opt.ckpt_interval) and run.step < opt.max_steps:
            save()
        run.log(record, clips=opt.batch_size)
    if run.step < opt.max_steps:  # stopped early: resume later
        return
    mean, std = latent_statistics(autoencoder, opt.config, 256, seed=opt.seed + 31)
    save(latent_mean=mean, latent_std=std)
    if opt.export != "none":
        export_checkpoint(run.path, opt.export)
        print(f"exported to {opt.export}")


if __name__ == "__main__":
    main(sys.argv[1:])
