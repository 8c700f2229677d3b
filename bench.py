"""FlashBench at our scale: video quality (FID, FVD), trajectory accuracy
(mask IoU, box IoU) and speed of every method (sample.py's registry), on the
same held-out scenes, first frames and noise, by number of objects; every
figure with a 95% bootstrap interval over the scenes.

    python bench.py                                  # every method whose checkpoints exist
    python bench.py --methods=teacher,naive,flashmotion --scenes_per_count=8
    python bench.py --json=results.json --gif=docs/bench.gif
    python bench.py --scenes=scenes/                 # every *.json scene file in a folder instead
                                                     # (FID/FVD of a few clips is mostly noise: see its real row)
    python bench.py --instruments                    # the instruments on real clips with known flaws
    python bench.py --free=1                         # a free object (no map) in every held-out scene
    python bench.py --pairs=flashmotion:naive        # paired differences (default: the paper's claims)
    python bench.py --condition=box --adapter=lora   # the LoRA adapters that read box maps
"""

import glob
import json
import os
import sys

import torch

import data
import degrade
import fvd
import metrics
from common import UserError, check_writable, parse_flags, require_at_least, set_threads
from sample import ROLE_FLAGS, available_methods, check_family, check_method, generate_clips, load_method, own_files
from scenes import scene_batch
from video import check_video_path, comparison_video, save_video

# The paper's claims as differences (a minus b): the misalignment, what each loss buys, the speed-up's cost.
DEFAULT_PAIRS = [("naive", "teacher"), ("flashmotion", "naive"), ("diffusion-only", "naive"),
                 ("flashmotion", "diffusion-only"), ("adversarial-only", "diffusion-only"),
                 ("flashmotion", "adversarial-only"), ("flashmotion", "fixed-lambda"), ("flashmotion", "dmd-joint"),
                 ("flashmotion", "lcm"), ("lcm", "dmd-joint"), ("flashmotion", "teacher")]

FLAGS = dict(
    config=("tiny", "micro | tiny | small: which checkpoints"),
    methods=("", "comma-separated; default every method whose checkpoints exist"),
    adapter=("", "controlnet | lora | resnet: which adapter family the methods use; default: an adapter run's "
                 "(--slow_adapter=...), else controlnet"),
    condition=("", "mask | box: the maps the adapters read (box maps: the paper's final condition); default: an "
                   "adapter run's, else mask"),
    checkpoints=("checkpoints", "the folder of the checkpoints"),
    scenes_per_count=(8, "held-out scenes per object count 1..6"),
    free=(0, "free objects added to each held-out scene (as many as fit in 6): no map shows them, no IoU scores them"),
    scenes=("", "a folder: run its *.json scene files instead of the held-out scenes"),
    teacher_steps=(50, "Euler steps of generator and teacher"),
    guidance=(3.0, "trajectory CFG of the teacher, 50 and 4 steps (docs/results.md: w = 3 is the best)"),
    seed=(0, "seed of the noise; the second sample of each scene uses seed + 1000"),
    json=("", "write the results here"),
    instruments=(False, "instead of methods: the instruments on real clips with known flaws (degrade.py)"),
    gif=("", "write a side-by-side video here (.gif or .mp4)"),
    threads=(0, "CPU threads; 0: half the cores (common.set_threads), 1 on a 2-core machine"),
    pairs=("default", "comma-separated a:b, a minus b on the same scenes and noise with paired intervals; "
                      "default: the paper's claims (DEFAULT_PAIRS) among the methods measured"),
    **ROLE_FLAGS,
)
# The paper's FlashBench columns first, then our extra statistics.
PAPER_COLUMNS = ["fid", "fvd", "miou", "box_iou", "nfe", "ms_per_video"]
EXTRA_COLUMNS = ["center_err_px", "psnr", "ssim", "roughness", "motion", "clipped", "diversity"]
HEADINGS = {"fid": "FID", "fvd": "FVD", "miou": "Mask IoU", "box_iou": "Box IoU", "nfe": "NFE",
            "ms_per_video": "ms / video"}


FLOOR_SEED = data.HELD_OUT_SEED + 100  # the real clips of the floor: other scenes than the bench's
REFERENCE_CLIPS = 2048  # real clips behind FID and FVD (with --free; else those stored with the feature network)


def benchmark_scene_list(config, per_count, seed=data.HELD_OUT_SEED, free=0):
    """per_count held-out scenes (data.Scene) for each count 1..MAX_OBJECTS of
    controlled objects, each with `free` free ones (as many as fit) in front."""
    return [scene for n in range(1, data.MAX_OBJECTS + 1)
            for scene in data.SpriteWorld(**data.video_shape(config), batch_size=per_count, seed=seed + n,
                                          n_objects=n, n_free=free).scenes(0)]


def benchmark_scenes(config, per_count, seed=data.HELD_OUT_SEED, free=0):
    """The same scenes as one batch dict (data.collate's keys)."""
    size = data.video_shape(config)["size"]
    return data.collate([data.to_sample(data.render(s), size)
                         for s in benchmark_scene_list(config, per_count, seed, free)])


def object_counts(scenes):
    """Each scene's number of controlled objects, as "controlled+free" where any scene has free ones."""
    controlled = scenes["controlled"].sum(1).tolist()
    free = (scenes["n_objects"] - scenes["controlled"].sum(1)).tolist()
    return controlled if not any(free) else [f"{c}+{f}" for c, f in zip(controlled, free)]


def per_scene_figures(videos, scenes, other=None):
    """Accuracy and quality statistics of each clip against its scene: a list of dicts."""
    accuracy = metrics.batch_trajectory_accuracy(videos, scenes)
    truth = scenes["video"]
    pairs = lambda i: (videos[i:i + 1], truth[i:i + 1])
    return [{**accuracy[i], **metrics.quality(*pairs(i), None if other is None else other[i:i + 1]),
             "ssim": metrics.ssim(*pairs(i))} for i in range(len(videos))]


def summarise(figures):
    """Means of per-scene figures, each with its 95% bootstrap interval over the scenes."""
    result = metrics.mean_of(figures)
    for key in figures[0]:
        result[f"{key}_ci"] = metrics.mean_interval([f[key] for f in figures])
    return result


def measure(method, scenes, encoder, references, opt):
    """One method's row: FID and FVD (both seeds), accuracy (first seed), quality statistics, speed.
    Returns (the row, the first seed's clips, the per-scene figures and features for paired differences)."""
    videos, seconds = generate_clips(method, scenes, guidance=opt.guidance, seed=opt.seed)
    other, _ = generate_clips(method, scenes, guidance=opt.guidance, seed=opt.seed + 1000)
    figures = per_scene_figures(videos, scenes, other)
    features = fvd.scene_features(encoder, torch.stack([videos, other], 1))
    result = {**fvd.frechet_scores(*references, features), **summarise(figures),
              "nfe": method.nfe(opt.guidance), "ms_per_video": 1000 * seconds}
    counts = object_counts(scenes)
    result["by_objects"] = {n: metrics.mean_of([f for f, c in zip(figures, counts) if c == n])
                            for n in sorted(set(counts))}
    return result, videos, (figures, features)


def paired_differences(pairs, per_scene, references):
    """Method a minus method b for each pair (a, b): accuracy per scene, FID
    and FVD by the same bootstrap draws of scenes; each with its 95% interval.
    Both ran on the same scenes, first frames and noise, so the scenes'
    shared difficulty cancels and the intervals are far tighter than the
    two rows' own."""
    rows = {}
    for a, b in pairs:
        (figures_a, features_a), (figures_b, features_b) = per_scene[a], per_scene[b]
        row = fvd.paired_frechet_scores(*references, features_a, features_b)
        for key in ("miou", "box_iou"):
            differences = [fa[key] - fb[key] for fa, fb in zip(figures_a, figures_b)]
            row[key], row[f"{key}_ci"] = sum(differences) / len(differences), metrics.mean_interval(differences)
        rows[f"{a} − {b}"] = row
    return rows


def pairs_of(opt, names):
    """The --pairs flag as (a, b) tuples among the measured methods."""
    if opt.pairs == "default":
        return [(a, b) for a, b in DEFAULT_PAIRS if a in names and b in names]
    pairs = [tuple(p.split(":")) for p in opt.pairs.split(",") if p]
    for pair in pairs:
        if len(pair) != 2 or not all(m in names for m in pair):
            raise UserError(f"--pairs: '{':'.join(pair)}' must be two measured methods a:b (measured: "
                            f"{', '.join(names)})")
    return pairs


def cell(value):
    if not isinstance(value, float):
        return str(value)
    return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"


def table(rows, columns, headings=None):
    """A markdown table: rows {name: {column: value}}, '-' where a row lacks a column."""
    names = [str((headings or {}).get(c, c)) for c in columns]
    lines = [f"| method | {' | '.join(names)} |", "|" + " --- |" * (len(columns) + 1)]
    lines += [f"| {name} | " + " | ".join(cell(r[c]) if c in r else "-" for c in columns) + " |"
              for name, r in rows.items()]
    return "\n".join(lines)


def with_interval(r, key, sign=""):
    lo, hi = r[f"{key}_ci"]
    return f"{r[key]:{sign}.3f} [{lo:{sign}.3f}, {hi:{sign}.3f}]"


def print_tables(results, real):
    print(table({**results, "real clips": real}, PAPER_COLUMNS + EXTRA_COLUMNS, HEADINGS))
    print("\n95% bootstrap intervals over scenes:\n")
    keys = [c for c in PAPER_COLUMNS + EXTRA_COLUMNS if f"{c}_ci" in next(iter(results.values()))]
    print(table({name: {k: with_interval(r, k) for k in keys if f"{k}_ci" in r} for name, r in
                 {**results, "real clips": real}.items()}, keys, HEADINGS))
    counts = sorted(next(iter(results.values()))["by_objects"])
    for key in ("miou", "box_iou"):
        print(f"\n{HEADINGS[key]} by number of objects:\n")
        print(table({name: {n: r["by_objects"][n][key] for n in counts} for name, r in results.items()}, counts))


def instruments(opt, encoder, references):
    """FlashBench's instruments on real clips drawn with known flaws
    (degrade.py): every figure next to the floor of two sets of real clips
    of the bench's size (a method's two samples of each scene)."""
    per_count = 2 * opt.scenes_per_count
    scene_list = benchmark_scene_list(opt.config, per_count)
    truth = benchmark_scenes(opt.config, per_count)  # the same scenes, as drawn

    def row(clips, against=None):  # FID and FVD; the per-scene figures too when measured against the truth
        figures = summarise(per_scene_figures(clips, against)) if against is not None else {}
        return {**fvd.frechet_scores(*references, fvd.scene_features(encoder, clips[:, None])), **figures}

    rows = {"real, set A": row(truth["video"], truth),
            "real, set B": row(benchmark_scenes(opt.config, per_count, seed=FLOOR_SEED)["video"])}
    for kind, (_, strengths, _) in degrade.DEGRADATIONS.items():
        for strength in strengths:
            rows[f"{kind} {strength}"] = row(degrade.degraded_clips(scene_list, kind, strength, seed=opt.seed), truth)
    for name, r in rows.items():
        print(f"{name}: FID {r['fid']:.2f}, FVD {r['fvd']:.2f}", file=sys.stderr)
    keys = ["fid", "fvd", "miou", "box_iou", "roughness", "motion"]
    print(table({name: {k: with_interval(r, k) for k in keys if k in r} for name, r in rows.items()}, keys, HEADINGS))
    print("\nstrengths: " + "; ".join(f"{kind}: {unit}" for kind, (_, _, unit) in degrade.DEGRADATIONS.items()))
    return rows


def main(argv):
    opt = parse_flags(FLAGS, argv, __doc__)
    check_family(opt)
    require_at_least(opt, ("scenes_per_count", "teacher_steps"))
    names = opt.methods.split(",") if opt.methods else available_methods(opt)
    for name in names:
        check_method(name)
    if not names and not opt.instruments:
        raise UserError(f"no method has its checkpoints in {opt.checkpoints}/: run bash pipeline.sh {opt.config}")
    if opt.json:
        check_writable(opt.json)
    if opt.gif:
        check_video_path(opt.gif)
    if opt.instruments and (opt.scenes or opt.gif):
        raise UserError("--instruments measures held-out real clips with known flaws: drop --scenes and --gif")
    if opt.free and (opt.scenes or opt.instruments):
        raise UserError("--free adds free objects to the held-out scenes: a scene file marks its own ('free': true), "
                        "and --instruments has none")
    if opt.scenes:
        paths = sorted(glob.glob(os.path.join(opt.scenes, "*.json")))
        if not paths:
            raise UserError(f"--scenes: no *.json scene files in '{opt.scenes}'")
        scenes = scene_batch(paths, opt.config, need_truth=True)  # every file read and checked before any work
    encoder_path = os.path.join(opt.checkpoints, f"video_encoder_{opt.config}.pt")
    if not os.path.exists(encoder_path):
        raise UserError(f"FID and FVD need {encoder_path}, which is missing: make it with "
                        f"python train_fvd.py --config={opt.config}")
    encoder, *references = fvd.load_encoder(encoder_path)
    opt.threads = set_threads(opt.threads)
    if opt.free:  # FID and FVD against real clips of the same world: the stored statistics have no free objects
        references = [fvd.Reference(*stats) for stats in fvd.reference_statistics(
            encoder, opt.config, REFERENCE_CLIPS, seed=FLOOR_SEED + 1, free=opt.free)]
    if opt.instruments:
        write_json(opt.json, {"instruments": instruments(opt, encoder, references), "settings": vars(opt)})
        return
    if not opt.scenes:
        scenes = benchmark_scenes(opt.config, opt.scenes_per_count, free=opt.free)

    pairs = pairs_of(opt, names)
    results, clips, per_scene, labels = {}, {}, {}, {}  # by label: a method with a run's own checkpoint names it
    for name in names:
        method = load_method(name, opt.config, opt.adapter, opt.condition, opt.checkpoints,
                             teacher_steps=opt.teacher_steps, files=own_files(opt))
        label = labels[name] = method.label
        results[label], clips[label], per_scene[label] = measure(method, scenes, encoder, references, opt)
        r = results[label]
        print(f"{label}: FID {r['fid']:.2f}, FVD {r['fvd']:.2f}, mask IoU {r['miou']:.3f}, box IoU {r['box_iou']:.3f}, "
              f"{r['ms_per_video']:.0f} ms/video", file=sys.stderr)
    # The floor: as many real clips as a method has, from other scenes of the same object counts.
    floor = (data.SpriteWorld(**data.video_shape(opt.config), batch_size=2 * len(scenes["video"]),
                              seed=FLOOR_SEED).batch(0) if opt.scenes else
             benchmark_scenes(opt.config, 2 * opt.scenes_per_count, seed=FLOOR_SEED, free=opt.free))
    real = {**fvd.frechet_scores(*references, fvd.scene_features(encoder, floor["video"][:, None])),
            **metrics.mean_of(metrics.batch_trajectory_accuracy(scenes["video"], scenes)),
            **metrics.quality(scenes["video"], scenes["video"]), "ssim": 1.0}
    del real["psnr"]  # infinite against itself
    print_tables(results, real)
    differences = paired_differences([(labels[a], labels[b]) for a, b in pairs], per_scene, references)
    if differences:
        keys = ["miou", "box_iou", "fid", "fvd"]
        print("\nPaired differences (a − b, same scenes and noise), 95% intervals:\n")
        print(table({name: {k: with_interval(r, k, "+") for k in keys} for name, r in differences.items()}, keys,
                    HEADINGS))
    write_json(opt.json, {"methods": results, "real": real, "pairs": differences, "settings": vars(opt)})
    if opt.gif:
        # one scene with 1, 3 and 5 objects (a folder: its first three scenes)
        picks = range(min(3, len(scenes["video"]))) if opt.scenes else [i * opt.scenes_per_count for i in (0, 2, 4)]
        save_video(opt.gif, comparison_video(scenes, list(clips.values()), picks, list(clips)))
        print(f"\nside by side (truth, {', '.join(results)}): {opt.gif}", file=sys.stderr)


def write_json(path, results):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
