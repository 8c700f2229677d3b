"""FlashBench at our scale: trajectory accuracy, video quality and speed of
every method (sample.py's registry), on the same held-out scenes, first
frames and noise, by number of objects.

    python bench.py                                  # every method whose checkpoints exist
    python bench.py --methods=teacher,naive,flashmotion --scenes_per_count=8
    python bench.py --json=results.json --gif=docs/bench.gif
    python bench.py --scenes=scenes/                 # every *.json scene file in a folder instead
                                                     # (FVD of a few clips is mostly noise: see its real row)
"""

import glob
import json
import os
import sys

import torch

import data
import fvd
import metrics
from common import UserError, check_writable, parse_flags, require_at_least, require_one_of
from model import CONFIGS, video_shape
from sample import METHODS, check_method, checkpoint_paths, generate_clips, load_method
from scenes import scene_batch

FLAGS = dict(
    config=("tiny", "micro | tiny | small: which checkpoints"),
    methods=("", "comma-separated; default every method whose checkpoints exist"),
    adapter=("controlnet", "controlnet | lora: which adapter family the methods use"),
    checkpoints=("checkpoints", "the folder of the checkpoints"),
    scenes_per_count=(8, "held-out scenes per object count 1..6"),
    scenes=("", "a folder: run its *.json scene files instead of the held-out scenes"),
    teacher_steps=(50, "Euler steps of generator and teacher"),
    guidance=(3.0, "trajectory CFG of the teacher, 50 and 4 steps (docs/results.md: w = 3 is the best)"),
    seed=(0, "seed of the noise; the second sample of each scene uses seed + 1000"),
    json=("", "write the results here"),
    gif=("", "write a side-by-side video here (.gif or .mp4)"),
)
COLUMNS = ["miou", "box_iou", "center_err_px", "fvd", "psnr", "ssim", "roughness", "motion", "clipped",
           "diversity", "nfe", "ms_per_video"]


def benchmark_scenes(config, per_count, seed=data.HELD_OUT_SEED):
    """per_count held-out scenes for each object count 1..MAX_OBJECTS, in one batch dict."""
    batches = [data.SpriteWorld(**video_shape(config), batch_size=per_count, seed=seed + n, n_objects=n).batch(0)
               for n in range(1, data.MAX_OBJECTS + 1)]
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def measure(method, scenes, encoder, reference, opt):
    """One method's row: accuracy (first seed), FVD (both seeds), quality statistics, speed."""
    videos, seconds = generate_clips(method, scenes, guidance=opt.guidance, seed=opt.seed)
    other, _ = generate_clips(method, scenes, guidance=opt.guidance, seed=opt.seed + 1000)
    accuracy = metrics.batch_trajectory_accuracy(videos, scenes)
    # FVD on both samples of every scene (2 x 6 x scenes_per_count clips) against the real statistics.
    # (No interval yet: drawing scenes with replacement duplicates clips, and FVD, biased upward at
    # few clips, lands above the estimate itself: docs/results.md.)
    result = {**metrics.mean_of(accuracy), **metrics.quality(videos, scenes["video"], other),
              "ssim": metrics.ssim(videos, scenes["video"]),
              "fvd": fvd.fvd(encoder, reference, torch.cat([videos, other])),
              "nfe": method.nfe(opt.guidance), "ms_per_video": 1000 * seconds}
    for key in accuracy[0]:  # 95% intervals over scenes
        result[f"{key}_ci"] = metrics.mean_interval([a[key] for a in accuracy])
    counts = scenes["n_objects"].tolist()
    result["by_objects"] = {n: metrics.mean_of([a for a, c in zip(accuracy, counts) if c == n])
                            for n in sorted(set(counts))}
    return result, videos


def print_tables(results, real):
    print(f"| method | {' | '.join(COLUMNS)} |")
    print("|" + " --- |" * (len(COLUMNS) + 1))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])
                                        for c in COLUMNS) + " |")
    print(f"| real clips | 1.000 | - | 0.000 | {real['fvd']:.3f} | - | 1.000 | {real['roughness']:.3f} | "
          f"{real['motion']:.3f} | {real['clipped']:.3f} | - | - | - |")
    print("\n95% bootstrap intervals over scenes:\n")
    print("| method | miou | box_iou | center_err_px |")
    print("|" + " --- |" * 4)
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.3f} [{r[c + '_ci'][0]:.3f}, {r[c + '_ci'][1]:.3f}]"
                                        for c in ("miou", "box_iou", "center_err_px")) + " |")
    print("\nmIoU by number of objects:\n")
    counts = sorted(next(iter(results.values()))["by_objects"])
    print("| method | " + " | ".join(str(n) for n in counts) + " |")
    print("|" + " --- |" * (len(counts) + 1))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r['by_objects'][n]['miou']:.3f}" for n in counts) + " |")


def main(argv):
    opt = parse_flags(FLAGS, argv, __doc__)
    require_one_of(opt, "config", CONFIGS)
    require_at_least(opt, ("scenes_per_count", "teacher_steps"))
    names = opt.methods.split(",") if opt.methods else [
        m for m in METHODS if all(os.path.exists(p) for p in checkpoint_paths(m, opt.config, opt.adapter,
                                                                                 opt.checkpoints))]
    for name in names:
        check_method(name)
    if not names:
        raise UserError(f"no method has its checkpoints in {opt.checkpoints}/: run bash pipeline.sh {opt.config}")
    if opt.json:
        check_writable(opt.json)
    if opt.gif:
        data.check_video_path(opt.gif)
    if opt.scenes:
        paths = sorted(glob.glob(os.path.join(opt.scenes, "*.json")))
        if not paths:
            raise UserError(f"--scenes: no *.json scene files in '{opt.scenes}'")
        scenes = scene_batch(paths, opt.config, need_truth=True)
    else:
        scenes = benchmark_scenes(opt.config, opt.scenes_per_count)
    encoder_path = os.path.join(opt.checkpoints, f"video_encoder_{opt.config}.pt")
    if not os.path.exists(encoder_path):
        raise UserError(f"FVD needs {encoder_path}, which is missing: make it with python fvd.py --config={opt.config}")
    encoder, reference = fvd.load_encoder(encoder_path)

    results, clips = {}, {}
    for name in names:
        method = load_method(name, opt.config, opt.adapter, opt.checkpoints, teacher_steps=opt.teacher_steps)
        results[name], clips[name] = measure(method, scenes, encoder, reference, opt)
        r = results[name]
        print(f"{name}: mIoU {r['miou']:.3f}, centre error {r['center_err_px']:.2f}px, FVD {r['fvd']:.2f}, "
              f"PSNR {r['psnr']:.2f}, {r['ms_per_video']:.0f} ms/video", file=sys.stderr)
    real = metrics.quality(scenes["video"], scenes["video"])
    # The FVD floor: as many real clips as a method has, from other scenes of the same object counts.
    floor = (data.SpriteWorld(**video_shape(opt.config), batch_size=2 * len(scenes["video"]),
                              seed=data.HELD_OUT_SEED + 100).batch(0) if opt.scenes else
             benchmark_scenes(opt.config, 2 * opt.scenes_per_count, seed=data.HELD_OUT_SEED + 100))
    real["fvd"] = fvd.fvd(encoder, reference, floor["video"])
    print_tables(results, real)

    if opt.json:
        os.makedirs(os.path.dirname(os.path.abspath(opt.json)), exist_ok=True)
        with open(opt.json, "w") as f:
            json.dump({"methods": results, "real": real, "settings": vars(opt)}, f, indent=1)
    if opt.gif:
        # one scene with 1, 3 and 5 objects (a folder: its first three scenes)
        picks = range(min(3, len(scenes["video"]))) if opt.scenes else [i * opt.scenes_per_count for i in (0, 2, 4)]
        data.save_video(opt.gif, data.comparison_video(scenes, list(clips.values()), picks))
        print(f"\nside by side (truth, {', '.join(results)}): {opt.gif}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
