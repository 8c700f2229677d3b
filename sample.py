"""Make a video from a scene with any method.

    python sample.py --steps 4                               # flashmotion, scenes/default.json
    python sample.py --method teacher --steps 50 --guidance 1   # no trajectory CFG (default 3)
    python sample.py --scene my_scene.json --seed 3 --out my.gif
    python sample.py --method naive --adapter lora --device cuda

The scene file gives the first frame (drawn from its objects, or your own
image) and each object's box in every frame (data.py, README). The GIF shows
the generated clip with the target boxes drawn over it, next to the
trajectory maps the adapter read; an MP4 is written too where imageio has
an ffmpeg plugin. The same seed gives the same video.
"""

import os
import sys
from types import SimpleNamespace

import numpy as np
import torch

import bench
import data
from common import UserError, apply_overrides


def main(argv):
    opt = SimpleNamespace(**apply_overrides(dict(
        method="flashmotion",
        steps=0,                   # 0: the method's own (4 for the fast methods, 50 for the teacher)
        scene="scenes/default.json",
        seed=0,
        out="",                    # default: samples/<method>_<scene>.gif
        adapter="controlnet",      # controlnet | lora
        guidance=3.0,              # trajectory guidance (CFG) of the slow (Euler) methods, as bench.py
        config="tiny",
        checkpoints="checkpoints",
        device="cpu",
    ), argv))
    if opt.config not in data.CONFIGS:
        raise UserError(f"--config must be one of {', '.join(data.CONFIGS)}")
    if opt.adapter not in ("controlnet", "lora"):
        raise UserError(f"--adapter must be controlnet or lora, got '{opt.adapter}'")
    if opt.device not in ("cpu", "cuda") or (opt.device == "cuda" and not torch.cuda.is_available()):
        raise UserError(f"--device must be cpu or cuda (with a GPU), got '{opt.device}'")
    if opt.steps < 0:
        raise UserError(f"--steps must be positive, got {opt.steps}")
    sample = bench.scene_batch([opt.scene], opt.config)  # refuses a bad scene, naming every wrong field
    torch.set_grad_enabled(False)
    device = torch.device(opt.device)
    model, sampler = bench.load_method(opt.method, opt.config, opt.adapter, opt.checkpoints, device)
    steps = opt.steps or (4 if sampler == "few-step" else 50)
    if sampler == "few-step" and steps != 4:
        raise UserError(f"method '{opt.method}' is a 4-step model: --steps must be 4 (or left out)")

    video, seconds = bench.run_method(model, sampler, {k: v.to(device) for k, v in sample.items()}, steps,
                                      opt.guidance, opt.seed)
    boxes = sample["boxes"][0, :int(sample["n_objects"][0])].numpy()
    frames = data.video_grid([[data.draw_boxes(data.to_uint8(video[0].cpu()), boxes, 8),
                               data.upscale(data.maps_to_uint8(sample["box_maps"][0]), 8)]])
    name = os.path.splitext(os.path.basename(opt.scene))[0]
    out = opt.out or os.path.join("samples", f"{opt.method}_{name}.gif")
    data.save_video(out, frames)
    written = [out]
    try:  # an MP4 beside it, where imageio can write one (imageio-ffmpeg)
        mp4 = os.path.splitext(out)[0] + ".mp4"
        data.save_video(mp4, np.ascontiguousarray(frames[:, :frames.shape[1] // 2 * 2, :frames.shape[2] // 2 * 2]))
        written.append(mp4)
    except Exception:
        pass
    print(f"{opt.method}, {steps} steps, seed {opt.seed}: {seconds:.2f} s on {device}; wrote {', '.join(written)}")


if __name__ == "__main__":
    main(sys.argv[1:])
