"""FlashBench's feature network, and the FID and FVD computed on it.

FID compares the distribution of a method's frames with the real one, FVD
that of its clips: embed both with a network, fit a Gaussian to each set of
embeddings, take the Frechet (2-Wasserstein) distance between the Gaussians.
The usual embeddings (Inception for FID, I3D for FVD) know nothing of 32x32
sprite clips, so we train a small network on the sprite world itself, with
dense tasks that make it see what a person sees in these clips:

  per pixel of every frame: which of the 8 object colours and which of the
             5 shapes covers it, or the background (so the local features
             hold shape, colour and edges); FID compares them pooled per frame;
  per object pixel, over time: how far its object moved since the last
             frame (so the motion features hold speed and smoothness); FVD
             compares them pooled per clip.

Trained on clean clips only, the features move when a clip looks wrong:
blur, faded colours, blobs instead of shapes, patch seams, frozen or jittery
motion (docs/results.md has the table; `python bench.py --instruments`
makes it). The checkpoint stores the statistics of real frames and clips
(`reference_clips` fresh scenes), so a method's FID/FVD needs only its own.

    python fvd.py                          # train the tiny network (CPU, ~20 minutes)
    python fvd.py --config=small --max_steps=4000
    python fvd.py --resume=true

Exported to checkpoints/video_encoder_<config>.pt (pipeline.sh does this too);
bench.py reads it from there.
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


def conv_block(c_in, c_out, stride=1, conv=nn.Conv2d):
    return nn.Sequential(conv(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())


class LabelledWorld(data.SpriteWorld):
    """The sprite world with what the network learns to say about each object:
    its shape (index into data.SHAPES; -1 for an empty slot) and exact centre
    per frame."""

    def sample(self, rng):
        scene = data.random_scene(rng, self.frames, self.size, self.n_objects)
        shapes = torch.full((data.MAX_OBJECTS,), -1)
        centers = torch.zeros(data.MAX_OBJECTS, self.frames, 2)
        for k, obj in enumerate(scene.objects):
            shapes[k] = data.SHAPES.index(obj.shape)
            centers[k] = torch.from_numpy(obj.centers).float()
        return {**data.to_sample(data.render(scene), self.size), "shapes": shapes, "centers": centers}


N_SHAPES = len(data.SHAPES)
PIXEL_CLASSES = (1 + N_COLORS) + (1 + N_SHAPES)  # each pixel: background or a colour; background or a shape


class VideoEncoder(nn.Module):
    """Clips (B, T, 3, H, W) in [-1, 1] -> frame features (B, T, 6 * width)
    and clip features (B, 2 * width); with the training heads on top.

    A conv trunk maps each frame to a grid of local features, 4x coarser than
    the frame, trained to say for every pixel of its cell which colour and
    which shape covers it: so a cell's feature holds the local shape, colour
    and edges. A 3D conv over the grids of all frames is trained to say, for
    every object pixel, how far its object moved since the last frame. The
    features are these grids pooled (the way FID pools Inception's last
    feature map), twice: over all cells, and over the cells where the network
    sees an object, so that small objects weigh as much as the background."""

    def __init__(self, frames, size, width=32):
        super().__init__()
        self.frames, self.size, self.width = frames, size, width
        self.trunk = nn.Sequential(conv_block(3, width), conv_block(width, 2 * width, stride=2),
                                   conv_block(2 * width, 3 * width, stride=2), conv_block(3 * width, 3 * width))
        self.pixel_head = nn.Sequential(nn.Conv2d(3 * width, 16 * PIXEL_CLASSES, 1), nn.PixelShuffle(4))
        self.motion = nn.Sequential(nn.Conv3d(3 * width, width, 1), conv_block(width, width, conv=nn.Conv3d),
                                    conv_block(width, 2 * width, conv=nn.Conv3d))
        self.flow_head = nn.Conv3d(2 * width, 16 * 2, 1)

    def config(self):
        return {"frames": self.frames, "size": self.size, "width": self.width}

    def run(self, video):
        """Grids (B, T, 3w, H/4, W/4), pixel logits (B, T, PIXEL_CLASSES, H, W),
        motion grids (B, 2w, T, H/4, W/4) and objectness (B, T, H/4, W/4)."""
        B = video.shape[0]
        grids = self.trunk(rearrange(video.float(), "b t c h w -> (b t) c h w"))  # (B*T, 3w, H/4, W/4)
        pixels = self.pixel_head(grids)  # (B*T, PIXEL_CLASSES, H, W)
        # the share of each cell's pixels that the network puts on an object
        objectness = F.avg_pool2d(1 - pixels[:, :1 + N_COLORS].softmax(1)[:, 0], 4)
        grids = rearrange(grids, "(b t) c h w -> b t c h w", b=B)
        motion = self.motion(rearrange(grids, "b t c h w -> b c t h w"))
        return (grids, rearrange(pixels, "(b t) k h w -> b t k h w", b=B), motion,
                rearrange(objectness, "(b t) h w -> b t h w", b=B))

    def features(self, video):
        """Frame features (B, T, 6w) and clip features (B, 2w)."""
        grids, _, motion, objectness = self.run(video)
        weight = objectness / objectness.sum((-2, -1), keepdim=True).clamp(min=1e-3)  # (B, T, h, w)
        frame = torch.cat([grids.mean((-2, -1)), (grids * weight[:, :, None]).sum((-2, -1))], -1)
        clip_weight = objectness / objectness.sum((1, 2, 3), keepdim=True).clamp(min=1e-3)
        clip = (motion * rearrange(clip_weight, "b t h w -> b 1 t h w")).sum((2, 3, 4))
        return frame, clip

    def forward(self, video):
        """The training heads: pixel logits (B, T, PIXEL_CLASSES, H, W) and
        each pixel's motion since the last frame (B, T, 2, H, W), in pixels."""
        _, pixels, motion, _ = self.run(video)
        flow = rearrange(self.flow_head(motion), "b c t h w -> (b t) c h w")
        return pixels, rearrange(F.pixel_shuffle(flow, 4), "(b t) c h w -> b t c h w", b=len(video))


def targets(batch, size):
    """A LabelledWorld batch as the heads' targets: each pixel's colour class
    (0 background, 1 + palette index) and shape class (0 background, 1 + index
    into data.SHAPES), (B, T, H, W) each; and the step of its object's centre
    since the last frame in pixels (B, T, 2, H, W; zero off objects and in
    frame 0)."""
    B, K, T = batch["boxes"].shape[:3]
    device = batch["boxes"].device
    colour_class = torch.zeros(B, T, size, size, dtype=torch.long, device=device)
    shape_class = torch.zeros_like(colour_class)
    flow = torch.zeros(B, T, 2, size, size, device=device)
    palette = torch.from_numpy(data.OBJECT_COLORS).long().to(device)
    for b in range(B):
        for k in range(int(batch["n_objects"][b])):
            slot = int((batch["colors"][b, k].long() == palette).all(-1).nonzero()[0])
            mask = batch["masks"][b, k].to(device)  # (T, H, W)
            colour_class[b][mask] = 1 + slot
            shape_class[b][mask] = 1 + int(batch["shapes"][b, k])
            centres = batch["centers"][b, k].to(device)  # (T, 2)
            step = torch.cat([torch.zeros(1, 2, device=device), centres[1:] - centres[:-1]])  # (T, 2)
            flow[b] = torch.where(mask[:, None], step[:, :, None, None], flow[b])
    return colour_class, shape_class, flow


# Objects cover a few percent of the pixels: weighting them keeps the pixel
# heads from settling on "all background".
OBJECT_PIXEL_WEIGHT = 5.0


def encoder_loss(encoder, batch, size):
    """Pixel cross-entropies (colour and shape) and the squared error of the
    object pixels' motion: (total, pixel loss, motion error in pixels)."""
    colour_class, shape_class, flow = targets(batch, size)
    pixels, predicted_flow = encoder(batch["video"])
    pixels = pixels.flatten(0, 1)  # (B*T, PIXEL_CLASSES, H, W)
    weight = lambda n: torch.tensor([1.0] + [OBJECT_PIXEL_WEIGHT] * n, device=pixels.device)
    pixel_loss = (F.cross_entropy(pixels[:, :1 + N_COLORS], colour_class.flatten(0, 1), weight=weight(N_COLORS))
                  + F.cross_entropy(pixels[:, 1 + N_COLORS:], shape_class.flatten(0, 1), weight=weight(N_SHAPES)))
    on_object = (colour_class[:, 1:] > 0)[:, :, None].expand_as(flow[:, 1:])  # frames 1..: frame 0 has no step
    motion_error = (predicted_flow[:, 1:] - flow[:, 1:])[on_object]
    motion_loss = (motion_error ** 2).mean()
    return pixel_loss + motion_loss, pixel_loss, motion_loss.sqrt()


@torch.no_grad()
def embed(encoder, videos, batch_size=32):
    """Features of clips (N, T, 3, H, W), float64: frame features of frames 1..
    (N, T-1, 6 * width; frame 0 is the given first frame, the same for every
    method) and clip features (N, 2 * width)."""
    encoder.eval()
    device = next(encoder.parameters()).device
    frames, clips = [], []
    for i in range(0, len(videos), batch_size):
        frame, clip = encoder.features(videos[i:i + batch_size].to(device))
        frames.append(frame[:, 1:].double().cpu())
        clips.append(clip.double().cpu())
    return torch.cat(frames), torch.cat(clips)


# ------------------------------------------------------- Frechet distance --

def gaussian_stats(features):
    """Mean and covariance (float64) of features (N, D)."""
    return features.mean(0), torch.cov(features.T)


def matrix_sqrt(cov):
    values, vectors = torch.linalg.eigh(cov)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distances(mean_a, cov_a, stats_b, root_b):
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_b^1/2 S_a S_b^1/2)^1/2), with
    symmetric eigendecompositions (no scipy): the square root of a product of
    two covariances has the trace of sqrt(S_b^1/2 S_a S_b^1/2). Batched over
    the leading dims of mean_a (..., D) and cov_a (..., D, D); root_b is S_b^1/2."""
    mu_b, cov_b = stats_b
    cross = torch.linalg.eigvalsh(root_b @ cov_a @ root_b).clamp(min=0).sqrt().sum(-1)
    trace = lambda cov: cov.diagonal(dim1=-2, dim2=-1).sum(-1)
    return ((mean_a - mu_b) ** 2).sum(-1) + trace(cov_a) + trace(cov_b) - 2 * cross


def frechet_distance(stats_a, stats_b, root_b=None):
    """The Frechet distance of two Gaussians (mean, covariance), a float.
    `root_b`, S_b^1/2, may be given when many sets are compared with one reference."""
    return float(frechet_distances(*stats_a, stats_b, matrix_sqrt(stats_b[1]) if root_b is None else root_b))


class Reference:
    """The Gaussian of real features that a method's features are compared with."""

    def __init__(self, mean, cov):
        self.stats, self.root = (mean, cov), matrix_sqrt(cov)

    def distance(self, features):
        """Frechet distance of features (N, D) to the reference."""
        return frechet_distance(gaussian_stats(features), self.stats, self.root)

    def draws(self, features, resamples=300, seed=0):
        """Distances of `resamples` bootstrap draws of the scenes: features
        (S, m, D), the m feature vectors of each of S scenes (frames, or the
        clips of its seeds), drawn again by scene. A drawn set repeats scenes,
        which shrinks its effective size and lifts the distance (FD is biased
        upward at few samples), so the draws are re-centred on the estimate
        (shifted by their mean's excess over it). The same (S, seed) draws the
        same scenes, so two methods' draws pair up."""
        S, m = features.shape[:2]
        estimate = self.distance(features.flatten(0, 1))
        # Each draw as counts per scene; its mean and covariance from per-scene sums (no copies of features).
        draws = torch.randint(S, (resamples, S), generator=torch.Generator().manual_seed(seed))
        counts = F.one_hot(draws, S).sum(1).to(features.dtype)  # (resamples, S)
        sums = features.sum(1)  # (S, D)
        products = torch.einsum("smd,sme->sde", features, features).flatten(1)  # (S, D*D)
        n = S * m
        mean = counts @ sums / n  # (resamples, D)
        second = (counts @ products).view(resamples, *features.shape[-1:] * 2) / n
        cov = (second - mean[:, :, None] * mean[:, None, :]) * n / (n - 1)
        values = frechet_distances(mean, cov, self.stats, self.root)
        return values - (values.mean() - estimate)

    def interval(self, features, resamples=300, level=0.95, seed=0):
        """95% bootstrap interval of `distance` over scenes (see draws)."""
        return percentile_interval(self.draws(features, resamples, seed), level)

    def paired_interval(self, features_a, features_b, resamples=300, level=0.95, seed=0):
        """95% interval of distance(a) - distance(b) for two methods on the same
        scenes: both drawn with the same scenes, so what the scenes share cancels."""
        return percentile_interval(self.draws(features_a, resamples, seed) - self.draws(features_b, resamples, seed),
                                   level)


def percentile_interval(values, level=0.95):
    tail = (1 - level) / 2
    return torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=values.dtype)).tolist()


def reference_statistics(encoder, config, clips, seed):
    """Gaussians of the frame features and the clip features of `clips` fresh
    real clips: ((frame mean, frame cov), (clip mean, clip cov))."""
    batch_size = min(64, clips)
    stream = data.SpriteWorld(**video_shape(config), batch_size=batch_size, seed=seed)
    frames, clip_features = zip(*[embed(encoder, stream.batch(i)["video"])
                                  for i in tqdm(range(clips // batch_size), desc="reference statistics")])
    return gaussian_stats(torch.cat(frames).flatten(0, 1)), gaussian_stats(torch.cat(clip_features))


def load_encoder(path):
    """The trained network and the real statistics stored with it: (encoder,
    frame Reference for FID, clip Reference for FVD)."""
    ckpt = load_checkpoint(path, kind="video_encoder")
    encoder = VideoEncoder(**ckpt["config"])
    encoder.load_state_dict(ckpt["encoder"])
    return encoder.eval(), Reference(*ckpt["frame_reference"]), Reference(*ckpt["clip_reference"])


def scene_features(encoder, clips):
    """clips (S, m, T, 3, H, W), m samples of each of S scenes -> frame
    features (S, m (T-1), D_f) and clip features (S, m, D_c), by scene."""
    S = clips.shape[0]
    frames, clip_features = embed(encoder, clips.flatten(0, 1))
    return (rearrange(frames, "(s m) t d -> s (m t) d", s=S),  # all frames of a scene's samples together
            rearrange(clip_features, "(s m) d -> s m d", s=S))


def frechet_scores(frame_reference, clip_reference, features):
    """FID (frames 1..) and FVD of scene_features, against the real statistics,
    each with its 95% interval over the scenes: {"fid", "fid_ci", "fvd", "fvd_ci"}."""
    frames, clip_features = features
    return {"fid": frame_reference.distance(frames.flatten(0, 1)), "fid_ci": frame_reference.interval(frames),
            "fvd": clip_reference.distance(clip_features.flatten(0, 1)),
            "fvd_ci": clip_reference.interval(clip_features)}


def paired_frechet_scores(frame_reference, clip_reference, features_a, features_b):
    """FID and FVD of method a minus method b on the same scenes and noise,
    each with its paired 95% interval: {"fid", "fid_ci", "fvd", "fvd_ci"}."""
    result = {}
    for key, reference, a, b in (("fid", frame_reference, features_a[0], features_b[0]),
                                 ("fvd", clip_reference, features_a[1], features_b[1])):
        result[key] = reference.distance(a.flatten(0, 1)) - reference.distance(b.flatten(0, 1))
        result[f"{key}_ci"] = reference.paired_interval(a, b)
    return result


FLAGS = dict(
    config=("tiny", "micro | tiny | small: the clips' shape"),
    out_dir=("", "default runs/video_encoder_<config>"),
    export=("", "default checkpoints/video_encoder_<config>.pt (\"none\": do not export)"),
    width=(32, "channels of the first conv; FID compares 6 x width features, FVD 2 x width"),
    batch_size=(16, "clips per step"),
    max_steps=(1500, "training steps"),
    stop_at=(0, "stop (with a checkpoint) after this step, to resume later; 0: run to max_steps"),
    lr=(2e-3, "peak learning rate"),
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
    require_at_least(opt, ("width",), 8)  # GroupNorm(8)
    require_at_least(opt, ("reference_clips",), 2)  # a covariance needs two clips
    shape = video_shape(opt.config)
    opt.out_dir = opt.out_dir or f"runs/video_encoder_{opt.config}"
    opt.export = opt.export or f"checkpoints/video_encoder_{opt.config}.pt"
    run = Run(opt, kind="video_encoder")

    encoder = VideoEncoder(**shape, width=opt.width).to(run.device)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=opt.lr, weight_decay=0.01)
    run.restore(encoder=encoder, optimizer=optimizer)
    print(f"FlashBench feature network: {sum(p.numel() for p in encoder.parameters()) / 1e6:.2f}M parameters, "
          f"{opt.config} clips {shape}, step {run.step}/{opt.max_steps}")
    train_encoder = run.wrap(encoder)

    def save(**extra):
        run.save(encoder, config=encoder.config(), encoder=encoder.state_dict(), optimizer=optimizer.state_dict(),
                 **extra)

    # Training clips come from their own seed; bench.py's held-out scenes use data.HELD_OUT_SEED.
    batches = run.batches(LabelledWorld(**shape, batch_size=opt.batch_size, seed=opt.seed + 11, start=run.step))
    for step in run.steps("feature network"):
        encoder.train()
        set_lr(optimizer, lr_at(step, opt.lr, opt.warmup, opt.max_steps))
        batch = {key: value.to(run.device) for key, value in next(batches).items()}
        loss, pixel_loss, motion_px = encoder_loss(train_encoder, batch, shape["size"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if run.due(opt.ckpt_interval) and run.step < opt.max_steps:
            save()
        run.log({"loss": round(loss.item(), 5), "pixel": round(pixel_loss.item(), 5),
                 "motion_px": round(motion_px.item(), 3)}, clips=opt.batch_size)
    if run.step < opt.max_steps:  # stopped early: resume later
        return
    # Real statistics from a seed neither training nor the benchmark uses.
    frame_reference, clip_reference = reference_statistics(encoder, opt.config, opt.reference_clips,
                                                           seed=opt.seed + 29)
    save(frame_reference=frame_reference, clip_reference=clip_reference, reference_clips=opt.reference_clips)
    if opt.export != "none":
        export_checkpoint(run.path, opt.export)
        print(f"exported to {opt.export}")


if __name__ == "__main__":
    main(sys.argv[1:])
