"""The Frechet video distance (FVD) of FlashBench, on a video encoder of our own.

FVD compares the distribution of a generator's clips with the real one: embed
both with a video network, fit a Gaussian to each set of embeddings, and take
the Frechet (2-Wasserstein) distance between the two Gaussians. The usual
embedding, I3D trained on Kinetics, knows nothing of 32x32 sprite clips, so
we train a small 3D-conv encoder on the sprite world itself. Its task makes
it look at what matters here: for each of the 8 object colours, is that
object in the clip, and where is its centre in every frame. Blur, noise,
smeared or wandering objects and wrong colours all move its features.

The encoder checkpoint also stores the statistics of the real clips
(`reference_clips` fresh scenes), so a method's FVD needs only its own clips.

    python fvd.py                          # train the tiny encoder (CPU, minutes)
    python fvd.py --config=small --max_steps=4000
    python fvd.py --resume=true

The trained encoder is exported to checkpoints/video_encoder_<config>.pt
(pipeline.sh does this too); bench.py reads it from there.
"""

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import data
from common import (Run, export_checkpoint, load_checkpoint, lr_at, parse_flags, require_at_least, require_one_of,
                    set_lr)
from model import CONFIGS, video_shape

N_COLORS = len(data.OBJECT_COLORS)


class VideoEncoder(nn.Module):
    """(B, T, 3, H, W) in [-1, 1] -> a feature vector (B, feature_dim), and from it
    the training heads: colour presence logits (B, 8) and centres (B, 8, T, 2)."""

    def __init__(self, frames, size, width=32, feature_dim=64):
        super().__init__()
        self.frames, self.size, self.width, self.feature_dim = frames, size, width, feature_dim
        channels = [3, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for i in range(4):  # the first conv keeps time, the others halve time and space
            stride = (1, 2, 2) if i == 0 else (2, 2, 2)
            layers += [nn.Conv3d(channels[i], channels[i + 1], 3, stride=stride, padding=1),
                       nn.GroupNorm(8, channels[i + 1]), nn.SiLU()]
        self.convs = nn.Sequential(*layers)
        with torch.no_grad():  # how many values the strided convs leave, for the linear layer after them
            flat = self.convs(torch.zeros(1, 3, frames, size, size)).numel()
        self.to_feature = nn.Linear(flat, feature_dim)
        self.presence = nn.Linear(feature_dim, N_COLORS)
        self.centres = nn.Linear(feature_dim, N_COLORS * frames * 2)

    def config(self):
        return {"frames": self.frames, "size": self.size, "width": self.width, "feature_dim": self.feature_dim}

    def features(self, video):
        x = self.convs(rearrange(video.float(), "b t c h w -> b c t h w"))
        return self.to_feature(x.flatten(1))  # (B, feature_dim): what FVD compares

    def forward(self, video):
        h = F.silu(self.features(video))
        centres = rearrange(self.centres(h), "b (k t two) -> b k t two", k=N_COLORS, two=2)
        return self.presence(h), centres


def targets(batch, size):
    """Which of the 8 colours are present (B, 8) and their box centres in
    [0, 1] per frame (B, 8, T, 2), from a data.collate batch."""
    B, _, T = batch["boxes"].shape[:3]
    device = batch["boxes"].device
    present = torch.zeros(B, N_COLORS, device=device)
    centres = torch.zeros(B, N_COLORS, T, 2, device=device)
    palette = torch.from_numpy(data.OBJECT_COLORS).long().to(device)
    for b in range(B):
        for k in range(int(batch["n_objects"][b])):
            slot = int((batch["colors"][b, k].long() == palette).all(-1).nonzero()[0])
            box = batch["boxes"][b, k]  # (T, 4)
            present[b, slot] = 1
            centres[b, slot] = torch.stack([box[:, 0] + box[:, 2], box[:, 1] + box[:, 3]], -1) / (2 * size)
    return present, centres


def encoder_loss(encoder, batch):
    present, centres = targets(batch, encoder.size)
    logits, predicted = encoder(batch["video"])
    presence_loss = F.binary_cross_entropy_with_logits(logits, present)
    where = present[..., None, None].expand_as(predicted)  # centres count only for objects in the clip
    centre_loss = (((predicted - centres) ** 2) * where).sum() / where.sum().clamp(min=1)
    return presence_loss + 10 * centre_loss, presence_loss, centre_loss


@torch.no_grad()
def embed(encoder, videos, batch_size=64):
    """Features (N, feature_dim) of clips (N, T, 3, H, W), in float64."""
    encoder.eval()
    device = next(encoder.parameters()).device
    return torch.cat([encoder.features(videos[i:i + batch_size].to(device)).double().cpu()
                      for i in range(0, len(videos), batch_size)])


def gaussian_stats(features):
    """Mean and covariance (float64) of features (N, D)."""
    return features.mean(0), torch.cov(features.T)


def frechet_distance(stats_a, stats_b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), with
    symmetric eigendecompositions (no scipy): the square root of a product of
    two covariances has the trace of sqrt(S_a^1/2 S_b S_a^1/2)."""
    (mu_a, cov_a), (mu_b, cov_b) = stats_a, stats_b
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp(min=0).sqrt().sum()
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * cross)


def reference_statistics(encoder, config, clips, seed):
    """Mean and covariance of the features of `clips` fresh real clips."""
    batch_size = min(64, clips)
    stream = data.SpriteWorld(**video_shape(config), batch_size=batch_size, seed=seed)
    features = torch.cat([embed(encoder, stream.batch(i)["video"])
                          for i in tqdm(range(clips // batch_size), desc="reference statistics")])
    return gaussian_stats(features)


def load_encoder(path):
    """The trained encoder and the reference (real-clip) statistics stored with it."""
    ckpt = load_checkpoint(path, kind="video_encoder")
    encoder = VideoEncoder(**ckpt["config"])
    encoder.load_state_dict(ckpt["encoder"])
    return encoder.eval(), (ckpt["reference_mean"], ckpt["reference_cov"])


def fvd(encoder, reference, videos):
    """FVD of clips (N, T, 3, H, W) against the reference statistics."""
    return frechet_distance(gaussian_stats(embed(encoder, videos)), reference)


FLAGS = dict(
    config=("tiny", "micro | tiny | small: the clips' shape"),
    out_dir=("", "default runs/video_encoder_<config>"),
    export=("", "default checkpoints/video_encoder_<config>.pt (\"none\": do not export)"),
    width=(32, "channels of the first conv"),
    feature_dim=(64, "features FVD compares"),
    batch_size=(32, "clips per step"),
    max_steps=(1500, "training steps"),
    stop_at=(0, "stop (with a checkpoint) after this step, to resume later; 0: run to max_steps"),
    lr=(1e-3, "peak learning rate"),
    warmup=(50, "linear warmup steps"),
    ckpt_interval=(250, "checkpoint every this many steps"),
    reference_clips=(2048, "real clips behind the stored reference statistics"),
    num_workers=(1, "data processes rendering clips"),
    seed=(0, "seed of weights and data"),
    compile=(False, "torch.compile the encoder"),
    resume=(False, "continue the run in out_dir"),
)


def main(argv):
    opt = parse_flags(FLAGS, argv, __doc__)
    require_one_of(opt, "config", CONFIGS)
    require_at_least(opt, ("batch_size", "max_steps", "ckpt_interval"))
    require_at_least(opt, ("reference_clips",), 2)  # a covariance needs two clips
    shape = video_shape(opt.config)
    opt.out_dir = opt.out_dir or f"runs/video_encoder_{opt.config}"
    opt.export = opt.export or f"checkpoints/video_encoder_{opt.config}.pt"
    run = Run(opt, kind="video_encoder")

    encoder = VideoEncoder(**shape, width=opt.width, feature_dim=opt.feature_dim).to(run.device)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=opt.lr, weight_decay=0.01)
    run.restore(encoder=encoder, optimizer=optimizer)
    print(f"video encoder for FVD: {sum(p.numel() for p in encoder.parameters()) / 1e6:.2f}M parameters, "
          f"{opt.config} clips {shape}, step {run.step}/{opt.max_steps}")
    train_encoder = run.wrap(encoder)

    def save(**extra):
        run.save(encoder, config=encoder.config(), encoder=encoder.state_dict(), optimizer=optimizer.state_dict(),
                 **extra)

    # Training clips come from their own seed; bench.py's held-out scenes use data.HELD_OUT_SEED.
    batches = run.batches(data.SpriteWorld(**shape, batch_size=opt.batch_size, seed=opt.seed + 11, start=run.step))
    for step in run.steps("video encoder"):
        encoder.train()
        set_lr(optimizer, lr_at(step, opt.lr, opt.warmup, opt.max_steps))
        batch = {key: value.to(run.device) for key, value in next(batches).items()}
        loss, presence_loss, centre_loss = encoder_loss(train_encoder, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if run.due(opt.ckpt_interval) and run.step < opt.max_steps:
            save()
        run.log({"loss": round(loss.item(), 5), "presence": round(presence_loss.item(), 5),
                 "centre_px": round(centre_loss.sqrt().item() * shape["size"], 3)}, clips=opt.batch_size)
    if run.step < opt.max_steps:  # stopped early: resume later
        return
    # Reference statistics of real clips, from a seed neither training nor the benchmark uses.
    mean, cov = reference_statistics(encoder, opt.config, opt.reference_clips, seed=opt.seed + 29)
    save(reference_mean=mean, reference_cov=cov, reference_clips=opt.reference_clips)
    if opt.export != "none":
        export_checkpoint(run.path, opt.export)
        print(f"exported to {opt.export}")


if __name__ == "__main__":
    main(sys.argv[1:])
