"""What a method does to each object, frame by frame (research, not shipped).

    python object_account.py --adapter=controlnet --methods=naive,adversarial-only,flashmotion

On FlashBench's scenes and noise (seed 0, the clips bench.py scores), every
controlled object in every frame 1.. where it is visible gets one verdict,
the first that applies:

  on path     the segmented object covers its target (mask IoU >= 0.5)
  split       found (at least a quarter of its target's area), in pieces:
              the largest holds less than SPLIT of its pixels (speckles)
  frozen      found, nearer its first-frame place than its target
              (targets that moved at least MOVED px)
  off path    found, centre more than NEAR px from the target's ("found"
              counts the object's colour outside other objects' targets:
              there it is the other object recoloured)
  misshapen   found near its target, the wrong size or shape
  recoloured  not found, and half its target or more holds colours off the
              line from the background to the object's colour (another hue,
              speckles of other objects' colours): something the colour
              segmentation cannot see and a learned segmenter may
  faded       not found, the target's colours between the background's and
              the object's

and every clip two figures: spurious frames (more than SPURIOUS pixels
outside every object's dilated target that differ from the background by
more than SATURATED) and the background's mean absolute change from the
real one where no target covers it ([-1, 1] scale); per method, how far
its latent clips lie off the autoencoder's range (round_trip_error), real
clips' latents beside. The degraded real clips of
degrade.py check the verdicts first: the real clip must be on path, freeze
frozen, jitter off path, fade faded, and the objects' colour channels
rolled (RGB to BRG) recoloured. Writes runs/object_account_<adapter>_<condition>.json
and a PNG strip of the frames where methods disagree most."""
import json
import sys

import imageio.v3 as iio
import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

import bench
import degrade
import metrics
from common import parse_flags, set_threads
from sample import generate_clips, load_method

VERDICTS = ("on path", "split", "frozen", "off path", "misshapen", "recoloured", "faded")
SATURATED = 0.25  # RGB distance from the background (channels in [0, 1]) above which a pixel is "something"
NEAR, MOVED = 2.0, 3.0  # px
SPLIT = 0.75
SPURIOUS = 4  # pixels

FLAGS = dict(adapter=("controlnet", "controlnet | lora | resnet"), condition=("mask", "mask | box"),
             methods=("naive,adversarial-only,flashmotion", "comma-separated methods (sample.METHODS)"),
             scenes_per_count=(8, "held-out scenes per object count"), threads=(0, "CPU threads"),
             run=("", "a stage-3 run's ckpt.pt: its fast adapter on the fast generator, one more method, 'run'"))


def largest_piece_share(mask):
    """The share of a (H, W) bool mask's pixels in its largest 8-connected piece."""
    labels = torch.where(mask, torch.arange(1, mask.numel() + 1).reshape(mask.shape).float(), torch.zeros(()))
    while True:  # every pixel of the mask takes the largest label around it until nothing changes
        new = torch.where(mask, F.max_pool2d(labels[None, None], 3, 1, 1)[0, 0], labels)
        if torch.equal(new, labels):
            return labels[mask].unique(return_counts=True)[1].max().item() / mask.sum().item()
        labels = new


def off_the_fade_line(rgb, background, color):
    """(T, H, W) bool: pixels of rgb (T, 3, H, W) in [0, 1] farther than SATURATED
    from the segment between the background (3, H, W) and an object's colour (3,)."""
    direction = color[:, None, None] - background  # (3, H, W)
    along = ((rgb - background) * direction).sum(1, keepdim=True) / (direction ** 2).sum(0).clamp(min=1e-6)
    nearest = background + along.clamp(0, 1) * direction  # (T, 3, H, W)
    return (rgb - nearest).norm(dim=1) > SATURATED


def account(video, truth, masks, colors, n_objects, controlled):
    """Verdict counts of one clip (T, 3, H, W) in [-1, 1], its spurious frames
    and its background's mean change."""
    n = int(n_objects)
    background = metrics.background_of(truth, masks[:n])  # (3, H, W) in [-1, 1]
    found = metrics.segment_objects(video, colors, n, background)  # (n, T, H, W)
    rgb, background01 = (video.float() + 1) / 2, (background + 1) / 2
    target = masks[:n]
    centre_target = metrics.centroids(target)  # (n, T, 2)
    counts = dict.fromkeys(VERDICTS, 0)
    for k in range(n):
        if not controlled[k]:
            continue
        recoloured = off_the_fade_line(rgb, background01, colors[k].float() / 255)  # (T, H, W)
        for t in range(1, video.shape[0]):
            area = target[k, t].sum().item()
            if area == 0:
                continue
            iou = (found[k, t] & target[k, t]).sum().item() / (found[k, t] | target[k, t]).sum().item()
            # the object's colour where another object should be is that object recoloured, not this one moved
            own = found[k, t] & ~torch.cat([target[:k, t], target[k + 1:, t]]).any(0)
            present = own.sum().item() >= area / 4
            centre = metrics.centroids(own)
            off = (centre - centre_target[k, t]).norm().item()
            from_start = (centre - centre_target[k, 0]).norm().item()
            moved = (centre_target[k, t] - centre_target[k, 0]).norm().item()
            if iou >= 0.5:
                verdict = "on path"
            elif present and largest_piece_share(own) < SPLIT:
                verdict = "split"
            elif present and moved >= MOVED and from_start < off:
                verdict = "frozen"
            elif present and off > NEAR:
                verdict = "off path"
            elif present:
                verdict = "misshapen"
            elif (recoloured[t] & target[k, t]).sum().item() >= area / 2:
                verdict = "recoloured"
            else:
                verdict = "faded"
            counts[verdict] += 1
    covered = F.max_pool2d(target.any(0).float()[:, None], 5, 1, 2)[:, 0].bool()[1:]  # (T-1, H, W), dilated 2 px
    uncovered = ~covered
    something = (rgb - background01).norm(dim=1)[1:] > SATURATED
    spurious = ((something & uncovered).sum((1, 2)) > SPURIOUS).sum().item()
    change = ((video[1:] - background).abs().mean(1) * uncovered).sum() / uncovered.sum().clamp(min=1)
    return counts, spurious, change.item()


def account_all(videos, scenes):
    """Verdict totals over a batch of clips, spurious frames, mean background change, per-clip verdicts."""
    total, spurious, change, per_clip = dict.fromkeys(VERDICTS, 0), 0, 0.0, []
    for i in range(len(videos)):
        counts, clip_spurious, clip_change = account(videos[i], scenes["video"][i], scenes["masks"][i],
                                                     scenes["colors"][i], scenes["n_objects"][i],
                                                     scenes["controlled"][i])
        per_clip.append(counts)
        total = {key: total[key] + counts[key] for key in total}
        spurious, change = spurious + clip_spurious, change + clip_change / len(videos)
    return {"verdicts": total, "spurious frames": spurious, "background change": round(change, 4)}, per_clip


def capture_latents(model):
    """Keep every latent clip the model decodes (a list filled as it samples)."""
    latents, decode = [], model.decode
    model.decode = lambda clip: decode(latents.append(clip) or clip)
    return latents


@torch.no_grad()
def round_trip_error(model, latents):
    """How far latent clips lie from what the autoencoder can show: the relative
    change of decoding and encoding them again, ||z - E(D(z))|| / ||z||, mean over clips."""
    again = model.encode(model.decode(latents).clamp(-1, 1))
    return round(((latents - again).flatten(1).norm(dim=1) / latents.flatten(1).norm(dim=1)).mean().item(), 4)


def main(argv):
    opt = parse_flags(FLAGS, argv, __doc__)
    set_threads(opt.threads)
    scene_list = bench.benchmark_scene_list("tiny", opt.scenes_per_count)
    scenes = bench.benchmark_scenes("tiny", opt.scenes_per_count)
    out = {}
    checks = {"real": ("blur", 0), "freeze 1.0": ("freeze", 1.0), "jitter 3 px": ("jitter", 3.0),
              "fade 0.7": ("fade", 0.7)}
    for name, (kind, strength) in checks.items():
        out[name] = account_all(degrade.degraded_clips(scene_list, kind, strength), scenes)[0]
        print(name, out[name], flush=True)
    objects = scenes["masks"].any(1)[:, :, None]  # (N, T, 1, H, W): every object's pixels
    rolled = torch.where(objects, scenes["video"].roll(1, 2), scenes["video"])  # RGB -> BRG on the objects
    out["channels rolled"] = account_all(rolled, scenes)[0]
    print("channels rolled", out["channels rolled"], flush=True)
    clips = {}
    names = opt.methods.split(",") + (["run"] if opt.run else [])
    for name in names:
        method = load_method("flashmotion", "tiny", opt.adapter, opt.condition, files={"fast_adapter": opt.run}) \
            if name == "run" else load_method(name, "tiny", opt.adapter, opt.condition)
        latents = capture_latents(method.model)
        clips[name], _ = generate_clips(method, scenes, guidance=3.0, seed=0)
        out[name], out[f"{name} per clip"] = account_all(clips[name], scenes)
        out[name]["latent round trip"] = round_trip_error(method.model, torch.cat(latents))
        print(name, out[name], flush=True)
    out["real"]["latent round trip"] = round_trip_error(method.model, method.model.encode(scenes["video"]))
    tag = f"{opt.adapter}_{opt.condition}" + ("_run" if opt.run else "")
    with open(f"runs/object_account_{tag}.json", "w") as f:
        json.dump(out, f, indent=1)
    # the strip: the clip where the first two methods' on-path counts differ most, frames 0-14 every 2nd
    first, second = names[:2]
    gap = [a["on path"] - b["on path"] for a, b in zip(out[f"{first} per clip"], out[f"{second} per clip"])]
    i = int(np.argmax(gap))
    rows = [scenes["video"][i]] + [clips[name][i] for name in names]
    strip = torch.cat([torch.cat(list(row[::2]), -1) for row in rows], -2)  # (3, rows * H, T/2 * W)
    image = ((rearrange(strip, "c h w -> h w c").clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
    iio.imwrite(f"runs/object_account_{tag}.png", np.kron(image, np.ones((4, 4, 1), dtype=np.uint8)))
    print(f"strip: scene {i} (rows: truth, {', '.join(names)})")


if __name__ == "__main__":
    main(sys.argv[1:])
