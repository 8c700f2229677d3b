"""Controlled damage to real clips: the check that FlashBench's instruments
see what they must.

Each degradation re-draws a real scene with one known flaw, at a strength,
the way a weak generator gets it wrong: blur, colours fading towards the
background, shapes turned into soft blobs, a 4x4 patch grid (a pixel DiT's
tokens), frozen motion, objects jittering off their path. Frame 0 stays
real, as it is given to every method. `python bench.py --instruments`
measures each with FID, FVD, mask and box IoU next to the real-vs-real floor
(docs/results.md); tests check that each one registers, and grows with its
strength.
"""

import copy

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

import data


def gaussian_blur(frames, sigma):
    """Separable Gaussian blur of frames (T, H, W, 3), edges replicated."""
    radius = int(np.ceil(3 * sigma))
    taps = torch.exp(-torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    taps = (taps / taps.sum()).view(1, 1, -1)
    x = rearrange(torch.from_numpy(frames), "t h w c -> (t c) 1 h w")
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), taps[..., None, :])
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), taps[..., None])
    return rearrange(x, "(t c) 1 h w -> t h w c", c=3).numpy()


def blur(scene, sigma, rng):
    video = data.render(scene).video
    video[1:] = gaussian_blur(video[1:], sigma)
    return video


def fade(scene, amount, rng):
    """Every object's colour moved `amount` of the way to the background under it."""
    rendered = data.render(scene)
    video, background = rendered.video, data.render_background(scene.background, scene.size)
    covered = rendered.masks.any(0)[1:, ..., None]  # (T-1, H, W, 1)
    video[1:] = np.where(covered, video[1:] + amount * (background - video[1:]), video[1:])
    return video


def blob(scene, amount, rng, softness=1.0):
    """Every object mixed, by `amount`, with a soft round blob of its colour
    and area at its centre: the shape is what goes."""
    real = data.render(scene).video
    blobs = np.repeat(data.render_background(scene.background, scene.size)[None], scene.frames, axis=0)
    coords = np.arange(scene.size) + 0.5
    for obj in scene.objects:  # back to front
        area = data.shape_mask(obj.shape, obj.size, obj.centers, scene.size).sum((1, 2))  # (T,)
        radius = np.sqrt(area / np.pi)[:, None, None]
        distance = np.hypot(coords[None, None, :] - obj.centers[:, 0, None, None],
                            coords[None, :, None] - obj.centers[:, 1, None, None])  # (T, H, W)
        alpha = np.clip((radius - distance) / softness + 0.5, 0, 1)[..., None]
        blobs = blobs + alpha * (np.asarray(obj.color, dtype=np.float32) / 255 - blobs)
    real[1:] = (1 - amount) * real[1:] + amount * blobs[1:]
    return real


def seams(scene, sigma, rng, patch=4):
    """A random offset per 4x4 patch, colour channel and frame: a patch grid."""
    video = data.render(scene).video
    T, H, W = video.shape[:3]
    offsets = rng.normal(0, sigma, (T - 1, H // patch, W // patch, 3)).astype(np.float32)
    video[1:] = np.clip(video[1:] + offsets.repeat(patch, 1).repeat(patch, 2), 0, 1)
    return video


def freeze(scene, amount, rng):
    """Objects travel only (1 - amount) of their way: 1 is a still clip."""
    scene = copy.deepcopy(scene)
    for obj in scene.objects:
        obj.centers = obj.centers[:1] + (1 - amount) * (obj.centers - obj.centers[:1])
    return data.render(scene).video


def jitter(scene, pixels, rng):
    """Objects `pixels` off their path in a fresh random direction every frame."""
    scene = copy.deepcopy(scene)
    for obj in scene.objects:
        angle = rng.uniform(0, 2 * np.pi, scene.frames - 1)
        obj.centers = obj.centers.copy()
        obj.centers[1:] += pixels * np.stack([np.cos(angle), np.sin(angle)], -1)
    return data.render(scene).video


# name: (function(scene, strength, rng), the two strengths the table shows, their unit)
DEGRADATIONS = {
    "blur": (blur, (0.75, 1.5), "Gaussian sigma, px"),
    "fade": (fade, (0.3, 0.4), "share of the way to the background"),
    "blob": (blob, (0.5, 1.0), "share of a soft blob mixed in"),
    "seams": (seams, (0.07, 0.1), "offset sd per 4x4 patch, of the [0, 1] range"),
    "freeze": (freeze, (0.5, 1.0), "share of the motion removed"),
    "jitter": (jitter, (1.5, 3.0), "px off the path, per frame"),
}


def degraded_clips(scenes, kind, strength, seed=0):
    """Clips (N, T, 3, H, W) in [-1, 1] of data.Scene objects, each drawn with
    one degradation; strength 0 is the real clip."""
    function = DEGRADATIONS[kind][0]
    rng = np.random.default_rng(seed)
    videos = [function(scene, strength, rng) if strength else data.render(scene).video for scene in scenes]
    return torch.from_numpy(rearrange(np.stack(videos), "n t h w c -> n t c h w") * 2 - 1).float()
