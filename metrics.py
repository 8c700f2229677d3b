"""Measuring generated clips: how well objects follow their trajectories.

The sprite world's objects each have a saturated colour of their own over a
static, desaturated background, so a colour segmentation finds them in a
generated clip without any learned detector. Every stage and bench.py
measure trajectory accuracy with the one function here, `trajectory_accuracy`.
"""

import torch
import torch.nn.functional as F
from einops import rearrange

# A pixel belongs to the object whose colour it is nearest to, among the
# scene's object colours and the background's colour at that pixel: so an
# object is found where it is even when its colour has drifted part of the
# way to the background or to another object's (less than half way), and
# not in background-coloured noise. Position is what the IoU measures;
# colour belongs to FID. Beyond this distance (Euclidean RGB, channels in
# [0, 1]) a colour is no object's: a grey or a wrong colour.
MAX_COLOR_DISTANCE = 0.5


def background_of(truth, masks):
    """The background's colour at every pixel, (3, H, W) in [-1, 1], from a
    true clip (T, 3, H, W) and its visible masks (K, T, H, W): the sprite
    world's backgrounds are static, so a pixel's value in the frames where no
    object covers it; a pixel covered in every frame takes the mean of its
    nearest known neighbours."""
    free = ~masks.to(truth.device).any(0)  # (T, H, W)
    count = free.float().sum(0)  # (H, W)
    background = (truth.float() * free[:, None]).sum(0) / count.clamp(min=1)
    known = (count > 0).float()[None]  # (1, H, W)
    while not known.all() and known.any():  # grow the known region one pixel ring at a time
        total = F.avg_pool2d((background * known)[None], 3, 1, 1, count_include_pad=False)[0]
        weight = F.avg_pool2d(known[None], 3, 1, 1, count_include_pad=False)[0]
        fill = (known == 0) & (weight > 0)
        background = torch.where(fill, total / weight.clamp(min=1e-6), background)
        known = known + fill.float()
    return background


def segment_objects(video, colors, n_objects, background):
    """video (T, 3, H, W) in [-1, 1], colors (K, 3) uint8, background (3, H, W)
    in [-1, 1] -> masks (n, T, H, W) bool."""
    rgb = rearrange((video.float() + 1) / 2, "t c h w -> t h w c")
    palette = colors[:n_objects].float().to(video.device) / 255  # (n, 3)
    to_objects = torch.cdist(rgb.reshape(-1, 3), palette).reshape(*rgb.shape[:-1], n_objects)  # (T, H, W, n)
    to_background = (rgb - rearrange((background.to(video.device) + 1) / 2, "c h w -> h w c")).norm(dim=-1)
    nearest = to_objects.argmin(-1)
    distance = to_objects.min(-1).values
    owned = (distance < to_background) & (distance < MAX_COLOR_DISTANCE)  # (T, H, W)
    return torch.stack([(nearest == k) & owned for k in range(n_objects)])  # (n, T, H, W)


def mask_boxes(masks):
    """Bounding boxes (x0, y0, x1, y1), pixel edges, of masks (..., H, W); zeros where empty."""
    H, W = masks.shape[-2:]
    rows, cols = masks.any(-1), masks.any(-2)  # (..., H), (..., W)
    ys, xs = torch.arange(H, device=masks.device), torch.arange(W, device=masks.device)
    y0 = torch.where(rows, ys, H).min(-1).values
    y1 = torch.where(rows, ys + 1, 0).max(-1).values
    x0 = torch.where(cols, xs, W).min(-1).values
    x1 = torch.where(cols, xs + 1, 0).max(-1).values
    empty = ~rows.any(-1)
    return torch.stack([x0, y0, x1, y1], -1).masked_fill(empty[..., None], 0).float()


def box_iou(a, b):
    """IoU of boxes (..., 4) in (x0, y0, x1, y1)."""
    w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = w * h
    area = lambda box: (box[..., 2] - box[..., 0]).clamp(min=0) * (box[..., 3] - box[..., 1]).clamp(min=0)
    return inter / (area(a) + area(b) - inter).clamp(min=1e-6)


def centroids(masks):
    """Centres of mass (x, y) in pixels of masks (..., H, W), pixel centres at +0.5."""
    H, W = masks.shape[-2:]
    m = masks.float()
    total = m.sum((-2, -1)).clamp(min=1)
    ys = torch.arange(H, device=masks.device).float() + 0.5
    xs = torch.arange(W, device=masks.device).float() + 0.5
    return torch.stack([(m.sum(-2) * xs).sum(-1) / total, (m.sum(-1) * ys).sum(-1) / total], -1)


def trajectory_accuracy(video, truth, masks, boxes, colors, n_objects, controlled=None):
    """How well one generated clip follows its trajectories.

    video (T, 3, H, W) in [-1, 1]; truth the true clip (its background is
    what an object is told apart from); masks (K, T, H, W) the target visible masks,
    boxes (K, T, 4) the target boxes, colors (K, 3), as data.to_sample gives
    them; controlled (K,) bool: only those objects are scored (default: all),
    though every object's colour takes part in the segmentation. Frame 0 is
    the given first frame, so only frames 1.. count, and only where the object
    is visible in the target. Returns a dict of floats:
      miou           mean over objects of the mean mask IoU over its frames;
      box_iou        the same for the box around the segmented pixels vs
                     the target box;
      center_err_px  mean distance between the centres of the segmented and
                     the target masks; a frame where the object was not
                     found at all counts as half the frame size.
    """
    n = int(n_objects)
    found = segment_objects(video, colors, n, background_of(truth, masks[:n]))[:, 1:]  # (n, T-1, H, W)
    target = masks[:n, 1:].to(found.device)
    visible = target.any((-2, -1))  # (n, T-1)
    inter = (found & target).sum((-2, -1)).float()
    union = (found | target).sum((-2, -1)).float().clamp(min=1)
    present = found.any((-2, -1))
    distance = (centroids(found) - centroids(target)).norm(dim=-1)
    distance = torch.where(present, distance, torch.full_like(distance, video.shape[-1] / 2))
    boxes_iou = box_iou(mask_boxes(found), boxes[:n, 1:].to(found.device))

    scored = visible.any(1)
    if controlled is not None:
        scored &= controlled[:n].to(scored.device)

    def per_object_mean(values):
        weights = visible.float()
        return ((values * weights).sum(1) / weights.sum(1).clamp(min=1))[scored].mean().item()

    return {"miou": per_object_mean(inter / union), "box_iou": per_object_mean(boxes_iou),
            "center_err_px": per_object_mean(distance)}


def batch_trajectory_accuracy(videos, batch):
    """trajectory_accuracy for each clip of a batch (data.collate's keys): a list of dicts."""
    return [trajectory_accuracy(videos[i], batch["video"][i], batch["masks"][i], batch["boxes"][i],
                                batch["colors"][i], batch["n_objects"][i], batch["controlled"][i])
            for i in range(len(videos))]


def versus(ours, baseline, baseline_name):
    """One log line: mean accuracy of ours, a baseline's in brackets."""
    return (f"held-out mIoU {ours['miou']:.3f} ({baseline_name} {baseline['miou']:.3f}), "
            f"centre error {ours['center_err_px']:.2f}px ({baseline['center_err_px']:.2f}px)")


def mean_of(results):
    """Average a list of metric dicts key by key."""
    return {key: sum(r[key] for r in results) / len(results) for key in results[0]}


# --------------------------------------------------------------- intervals --
# Every figure of FlashBench carries a 95% percentile bootstrap interval over
# its scenes: the scenes drawn again with replacement (another bench of the
# same size). fvd.Reference draws its Frechet distances with the same draws.

def bootstrap_draws(n, resamples, seed=0):
    """(resamples, n) indices of n scenes drawn with replacement; the same (n, seed)
    draws the same scenes, so two methods measured on the same scenes pair up."""
    return torch.randint(n, (resamples, n), generator=torch.Generator().manual_seed(seed))


def percentile_interval(values, level=0.95):
    """The central `level` of bootstrap values (a tensor): [lo, hi]."""
    tail = (1 - level) / 2
    return torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=values.dtype)).tolist()


def mean_interval(values, resamples=1000, level=0.95, seed=0):
    """Interval of the mean of per-scene values (a list of floats)."""
    values = torch.tensor(values, dtype=torch.float64)
    return percentile_interval(values[bootstrap_draws(len(values), resamples, seed)].mean(1), level)


# ------------------------------------------------------------ video quality --
# Cheap statistics that show the known failure modes of few-step and DMD
# generators next to the real clips' values: noise or blur (roughness above
# or below the real one), static videos (motion), oversaturated colours
# (clipped pixels) and collapse (samples of one first frame all alike).

def roughness(videos):
    """Mean absolute difference between horizontally neighbouring pixels,
    frames 1.. of (B, T, C, H, W): above the real value is noise, below is blur."""
    frames = videos[:, 1:].float()
    return (frames[..., 1:] - frames[..., :-1]).abs().mean().item()


def motion(videos):
    """Mean absolute change from frame 0: near 0 is a static video."""
    return (videos[:, 1:].float() - videos[:, :1].float()).abs().mean().item()


def clipped(videos):
    """Fraction of pixel values at the ends of [-1, 1]: oversaturation."""
    return (videos[:, 1:].float().abs() > 0.98).float().mean().item()


def psnr(videos, truth):
    """PSNR in dB of frames 1.. against the true clips, signal range 2 ([-1, 1])."""
    mse = ((videos[:, 1:].float() - truth[:, 1:].float()) ** 2).mean(dim=(1, 2, 3, 4)).clamp(min=1e-10)
    return (10 * torch.log10(4 / mse)).mean().item()


def ssim(videos, truth, window=7, sigma=1.5):
    """Mean SSIM (Wang et al. 2004) of frames 1.. against the true clips: local
    means, variances and covariance under a Gaussian window, per channel,
    signal range 2 ([-1, 1]), averaged over the valid (unpadded) positions."""
    x = rearrange(videos[:, 1:].double(), "b t c h w -> (b t) c h w")
    y = rearrange(truth[:, 1:].double(), "b t c h w -> (b t) c h w")
    channels = x.shape[1]
    taps = torch.exp(-(torch.arange(window, dtype=torch.float64) - (window - 1) / 2) ** 2 / (2 * sigma ** 2))
    kernel = torch.outer(taps, taps) / taps.sum() ** 2
    kernel = kernel.expand(channels, 1, window, window).to(x.device)
    blur = lambda image: torch.nn.functional.conv2d(image, kernel, groups=channels)
    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x ** 2, blur(y * y) - mu_y ** 2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return index.mean().item()


def diversity(videos_a, videos_b):
    """Mean absolute difference between two samples of the same first frames
    (different noise), frames 1..: near 0 is mode collapse."""
    return (videos_a[:, 1:].float() - videos_b[:, 1:].float()).abs().mean().item()


def quality(videos, truth, videos_other_seed=None):
    """All the above for a batch of generated clips (B, T, C, H, W) against the true ones."""
    result = {"roughness": roughness(videos), "motion": motion(videos), "clipped": clipped(videos),
              "psnr": psnr(videos, truth)}
    if videos_other_seed is not None:
        result["diversity"] = diversity(videos, videos_other_seed)
    return result
