"""FlashBench at our scale: trajectory accuracy, video quality and speed of
every method, on the same held-out scenes, first frames and noise.

    python bench.py                                  # every method whose checkpoints exist
    python bench.py --methods=teacher,naive,flashmotion --scenes_per_count=8
    python bench.py --json=results.json --gif=docs/bench.gif
    python bench.py --scenes=scenes/                 # every *.json scene file in a folder instead
                                                     # (FVD of a few clips is mostly noise: see its real row)

Methods (DESIGN.md), each a (generator, adapter, sampler) triple:

  generator         slow generator alone, 50 Euler steps (no trajectory: the floor)
  teacher           slow generator + slow adapter, 50 steps, trajectory guidance (CFG)
  teacher-4         the same pair and guidance, 4 Euler steps
  fast-generator    fast generator alone, 4 steps (no trajectory)
  naive             fast generator + slow adapter as is, 4 steps
  dmd-joint         generator + adapter distilled together with DMD, 4 steps
  diffusion-only    fast generator + adapter finetuned with the diffusion loss, 4 steps
  adversarial-only  fast generator + adapter finetuned with the adversarial loss, 4 steps
  flashmotion       fast generator + hybrid-finetuned adapter, 4 steps
"""

import glob
import os
import sys
import time
from types import SimpleNamespace

import torch

import adapter as A
import data
import distill as D
import fvd
import metrics
import model as M
from common import UserError, apply_overrides, load_checkpoint

METHODS = ("generator", "teacher", "teacher-4", "fast-generator", "naive", "dmd-joint", "diffusion-only",
           "adversarial-only", "flashmotion")
FINETUNE_LOSS = {"diffusion-only": "diffusion", "adversarial-only": "adversarial", "flashmotion": "hybrid"}


def checkpoint_paths(method, config, adapter_kind, folder="checkpoints"):
    """The checkpoint files a method needs, by role."""
    slow = os.path.join(folder, f"slow_generator_{config}.pt")
    fast = os.path.join(folder, f"fast_generator_{config}.pt")
    slow_adapter = os.path.join(folder, f"slow_adapter_{adapter_kind}_{config}.pt")
    if method == "generator":
        return {"generator": slow}
    if method in ("teacher", "teacher-4"):
        return {"generator": slow, "adapter": slow_adapter}
    if method == "fast-generator":
        return {"generator": fast}
    if method == "naive":
        return {"generator": fast, "adapter": slow_adapter}
    if method == "dmd-joint":
        return {"joint": os.path.join(folder, f"dmd_joint_{config}.pt")}
    return {"generator": fast,
            "adapter": os.path.join(folder, f"fast_adapter_{FINETUNE_LOSS[method]}_{adapter_kind}_{config}.pt")}


def how_to_make(path):
    name = os.path.basename(path)
    script = {"slow_generator": "train.py", "slow_adapter": "adapter.py", "fast_generator": "distill.py",
              "dmd_joint": "distill.py --controlled=true", "fast_adapter": "hybrid_finetune.py"}
    for prefix, command in script.items():
        if name.startswith(prefix):
            return f"python {command} (then copy its ckpt.pt there), or bash pipeline.sh"
    return "see the README"


def load_method(method, config="tiny", adapter_kind="controlnet", folder="checkpoints", device="cpu"):
    """(model, sampler) for a method: model is called like the generator; sampler is
    'euler' (the slow pair's) or 'few-step' (the fast generator's)."""
    if method not in METHODS:
        raise UserError(f"unknown method '{method}' (known: {', '.join(METHODS)})")
    paths = checkpoint_paths(method, config, adapter_kind, folder)
    for path in paths.values():
        if not os.path.exists(path):
            raise UserError(f"method '{method}' needs {path}, which is missing: make it with {how_to_make(path)}")
    if "joint" in paths:
        ckpt = load_checkpoint(paths["joint"], kind="dmd_joint")
        generator = M.model_from_checkpoint(ckpt | {"ema": {k[len("generator."):]: v for k, v in ckpt["ema"].items()
                                                            if k.startswith("generator.")}})
        adapter = A.build_adapter(ckpt["adapter_config"]["type"], generator,
                                  blocks=ckpt["adapter_config"].get("blocks", 0),
                                  rank=ckpt["adapter_config"].get("rank", 16))
        model = A.Controlled(generator, adapter)
        model.load_state_dict(ckpt["ema"])
        return model.to(device).eval(), "few-step"
    generator_ckpt = load_checkpoint(paths["generator"])
    generator = M.model_from_checkpoint(generator_ckpt)
    sampler = "few-step" if generator_ckpt["kind"] == "fast_generator" else "euler"
    if "adapter" not in paths:
        return generator.to(device).eval(), sampler
    adapter_ckpt = load_checkpoint(paths["adapter"])
    adapter = A.adapter_from_checkpoint(adapter_ckpt, generator, generator_ckpt,
                                        allow_other_generator=method == "naive")
    return A.Controlled(generator, adapter).to(device).eval(), sampler


@torch.no_grad()
def run_method(model, sampler, scenes, steps, guidance=1.0, seed=0, batch_size=8):
    """Generate every scene (first frame + box maps). Returns (videos, seconds per video)."""
    controlled = isinstance(model, A.Controlled)
    videos, seconds = [], 0.0
    for start in range(0, len(scenes["video"]), batch_size):
        first = scenes["video"][start:start + batch_size, 0]
        conditions = {}
        if controlled:
            conditions["trajectory"] = scenes["box_maps"][start:start + batch_size]
        generator = torch.Generator(device=first.device).manual_seed(seed + start)
        begin = time.perf_counter()
        if sampler == "few-step":
            video = D.fast_generate(model, first, generator, **conditions)
        else:
            if controlled:
                conditions["uncond"] = {"traj_keep": torch.zeros(len(first), device=first.device)}
            video = M.generate(model, first, steps=steps, cfg_scale=guidance if controlled else 1.0,
                               generator=generator, **conditions)
        seconds += time.perf_counter() - begin
        videos.append(video)
    return torch.cat(videos), seconds / len(scenes["video"])


def benchmark_scenes(config, per_count, seed=data.HELD_OUT_SEED):
    """per_count held-out scenes for each object count 1..MAX_OBJECTS, in one batch dict."""
    shape = data.CONFIGS[config]
    batches = [data.SpriteWorld(**shape, batch_size=per_count, seed=seed + n, n_objects=n).batch(0)
               for n in range(1, data.MAX_OBJECTS + 1)]
    return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}


def scene_batch(paths, config, need_truth=False):
    """Scene files -> one batch (data.collate's keys), every file read and checked
    before anything is generated. need_truth refuses scenes with a first frame
    of their own: they have no true clip and no object colours to measure."""
    shape = data.CONFIGS[config]
    samples = []
    for path in paths:
        scene = data.load_scene(path)  # refuses a bad scene, naming every wrong field
        if (scene.size, scene.frames) != (shape["size"], shape["frames"]):
            raise UserError(f"{path}: 'size' {scene.size} and 'frames' {scene.frames} must be "
                            f"{shape['size']} and {shape['frames']} for the {config} models")
        rendered = data.render(scene)
        if need_truth and not rendered.has_video:
            raise UserError(f"{path}: a scene with its own 'first_frame' has no true clip to measure against; "
                            f"bench.py needs scenes drawn from objects (sample.py takes both)")
        samples.append(data.to_sample(rendered, scene.size))
    return data.collate(samples)


def main(argv):
    opt = SimpleNamespace(**apply_overrides(dict(
        config="tiny",
        methods="",               # comma-separated; default: every method whose checkpoints exist
        adapter="controlnet",     # controlnet | lora: which adapter family the methods use
        checkpoints="checkpoints",
        scenes_per_count=8,       # held-out scenes per object count 1..6
        scenes="",                # a folder: run its *.json scene files instead of the held-out scenes
        teacher_steps=50,
        guidance=3.0,             # trajectory CFG of the teacher, 50 and 4 steps (mIoU 0.30/0.43/0.45 at w=1/2/3)
        seed=0,
        json="",
        gif="",
    ), argv))
    if opt.config not in data.CONFIGS:
        raise UserError(f"--config must be one of {', '.join(data.CONFIGS)}")
    torch.set_grad_enabled(False)
    names = opt.methods.split(",") if opt.methods else [
        m for m in METHODS if all(os.path.exists(p) for p in checkpoint_paths(m, opt.config, opt.adapter,
                                                                                 opt.checkpoints).values())]
    if not names:
        raise UserError(f"no method has its checkpoints in {opt.checkpoints}/: run bash pipeline.sh {opt.config}")
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
        model, sampler = load_method(name, opt.config, opt.adapter, opt.checkpoints)
        steps = 4 if name == "teacher-4" or sampler == "few-step" else opt.teacher_steps
        videos, seconds = run_method(model, sampler, scenes, steps, opt.guidance, opt.seed)
        other, _ = run_method(model, sampler, scenes, steps, opt.guidance, opt.seed + 1000)
        accuracy = metrics.batch_trajectory_accuracy(videos, scenes)
        # FVD on both samples of every scene (2 x 6 x scenes_per_count clips) against the real statistics
        result = {**metrics.mean_of(accuracy), **metrics.quality(videos, scenes["video"], other),
                  "ssim": metrics.ssim(videos, scenes["video"]),
                  "fvd": fvd.fvd(encoder, reference, torch.cat([videos, other])),
                  "nfe": steps * (2 if sampler == "euler" and isinstance(model, A.Controlled) and opt.guidance != 1
                                  else 1),
                  "ms_per_video": 1000 * seconds}
        counts = scenes["n_objects"].tolist()
        result["by_objects"] = {n: metrics.mean_of([a for a, c in zip(accuracy, counts) if c == n])
                                for n in sorted(set(counts))}
        results[name], clips[name] = result, videos
        print(f"{name}: mIoU {result['miou']:.3f}, centre error {result['center_err_px']:.2f}px, "
              f"FVD {result['fvd']:.2f}, PSNR {result['psnr']:.2f}, {result['ms_per_video']:.0f} ms/video",
              file=sys.stderr)

    columns = ["miou", "box_iou", "center_err_px", "fvd", "psnr", "ssim", "roughness", "motion", "clipped",
               "diversity", "nfe", "ms_per_video"]
    real = metrics.quality(scenes["video"], scenes["video"])
    # The FVD floor: as many real clips as a method has, from other scenes of the same object counts.
    floor = (data.SpriteWorld(**data.CONFIGS[opt.config], batch_size=2 * len(scenes["video"]),
                              seed=data.HELD_OUT_SEED + 100).batch(0) if opt.scenes else
             benchmark_scenes(opt.config, 2 * opt.scenes_per_count, seed=data.HELD_OUT_SEED + 100))
    real["fvd"] = fvd.fvd(encoder, reference, floor["video"])
    print(f"| method | {' | '.join(columns)} |")
    print("|" + " --- |" * (len(columns) + 1))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c])
                                        for c in columns) + " |")
    print(f"| real clips | 1.000 | - | 0.000 | {real['fvd']:.3f} | - | 1.000 | {real['roughness']:.3f} | "
          f"{real['motion']:.3f} | {real['clipped']:.3f} | - | - | - |")
    print("\nmIoU by number of objects:\n")
    counts = sorted(next(iter(results.values()))["by_objects"])
    print("| method | " + " | ".join(str(n) for n in counts) + " |")
    print("|" + " --- |" * (len(counts) + 1))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(f"{r['by_objects'][n]['miou']:.3f}" for n in counts) + " |")
    if opt.json:
        import json
        with open(opt.json, "w") as f:
            json.dump({"methods": results, "real": real, "settings": vars(opt)}, f, indent=1)
    if opt.gif:
        # one scene with 1, 3 and 5 objects (a folder: its first three scenes)
        picks = list(range(min(3, len(scenes["video"])))) if opt.scenes else [i * opt.scenes_per_count
                                                                             for i in (0, 2, 4)]
        rows = []
        for i in picks:
            boxes = scenes["boxes"][i, :int(scenes["n_objects"][i])].numpy()
            rows.append([data.draw_boxes(data.to_uint8(scenes["video"][i]), boxes, 4)] +
                        [data.draw_boxes(data.to_uint8(clips[name][i]), boxes, 4) for name in results])
        data.save_video(opt.gif, data.video_grid(rows))
        print(f"\nside by side (truth, {', '.join(results)}): {opt.gif}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
