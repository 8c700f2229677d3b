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

train_fvd.py trains it; bench.py reads it from
checkpoints/video_encoder_<config>.pt.
"""

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import data
from autoencoder import conv_block
from common import UserError, load_checkpoint
from metrics import bootstrap_draws, percentile_interval

N_COLORS = len(data.OBJECT_COLORS)
N_SHAPES = len(data.RANDOM_SHAPES)  # the shapes of the world's random scenes, not every scene file's
FIRST_SHAPES = ("circle", "square", "triangle", "diamond", "cross")  # of a network saved before they were named
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
        draws = bootstrap_draws(S, resamples, seed)
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


def reference_statistics(encoder, config, clips, seed, free=0):
    """Gaussians of the frame features and the clip features of `clips` fresh
    real clips (with `free` free objects each, as many as fit): ((frame mean,
    frame cov), (clip mean, clip cov))."""
    batch_size = min(64, clips)
    stream = data.SpriteWorld(**data.video_shape(config), batch_size=batch_size, seed=seed, n_free=free)
    frames, clip_features = zip(*[embed(encoder, stream.batch(i)["video"])
                                  for i in tqdm(range(clips // batch_size), desc="reference statistics")])
    return gaussian_stats(torch.cat(frames).flatten(0, 1)), gaussian_stats(torch.cat(clip_features))


def load_encoder(path):
    """The trained network and the real statistics stored with it: (encoder,
    frame Reference for FID, clip Reference for FVD)."""
    ckpt = load_checkpoint(path, kind="video_encoder")
    shapes = tuple(ckpt.get("shapes", FIRST_SHAPES))
    if shapes != data.RANDOM_SHAPES:
        raise UserError(f"{path} was trained on a world of the shapes {', '.join(shapes)}; data.RANDOM_SHAPES "
                        f"draws {', '.join(data.RANDOM_SHAPES)}: retrain it (python train_fvd.py), or add shapes "
                        f"for scene files only, after the first five of data.SHAPES")
    encoder = VideoEncoder(**ckpt["config"])
    try:
        encoder.load_state_dict(ckpt["encoder"])
    except RuntimeError:  # its heads' sizes: another world's colours
        raise UserError(f"{path} was trained on a world of other colours than data.OBJECT_COLORS' "
                        f"{N_COLORS}: retrain it (python train_fvd.py)") from None
    return encoder.eval(), Reference(*ckpt["frame_reference"]), Reference(*ckpt["clip_reference"])


def held_out_fid(clips, config, path=""):
    """FID of generated clips (N, T, 3, H, W), frames 1.. as FlashBench's,
    against the real frames' statistics stored with the feature network at
    `path` (default the shipped one of the config): the held-out figure a
    trainer logs as it goes. None where the network is missing (the run then
    logs no FID)."""
    path = path or f"checkpoints/video_encoder_{config}.pt"
    if not os.path.exists(path):
        return None
    encoder, frame_reference, _ = load_encoder(path)
    frames, _ = embed(encoder, clips.float().cpu())  # (N, T - 1, D)
    return round(frame_reference.distance(frames.flatten(0, 1)), 3)


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
