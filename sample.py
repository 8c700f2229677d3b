"""Every method by name (the registry FlashBench measures) and a video from a scene.

    python sample.py --steps 4                                  # flashmotion, scenes/default.json
    python sample.py --method teacher --steps 50 --guidance 1   # no trajectory CFG (default 3)
    python sample.py --scene my_scene.json --seed 3 --out my.mp4
    python sample.py --method naive --adapter lora --device cuda
    python sample.py --condition box                            # adapters that read box maps

The scene file gives the first frame (drawn from its objects, or your own
image) and each object's box in every frame (scenes.py). The video shows the
generated clip with the target boxes drawn over it, next to the trajectory
maps the adapter read. GIF always; MP4 where imageio's ffmpeg plugin is
installed (pip install imageio-ffmpeg). The same seed gives the same video.

Methods, each a (generator, adapter, sampler) triple:

  generator         slow generator alone, 50 Euler steps (no trajectory: the floor)
  teacher           slow generator + slow adapter, 50 steps, trajectory guidance (CFG)
  teacher-4         the same pair and guidance, 4 Euler steps
  fast-generator    fast generator alone, 4 steps (no trajectory)
  naive             fast generator + slow adapter as is, 4 steps
  dmd-joint         generator + adapter distilled together with DMD, 4 steps
  lcm               generator + adapter distilled together by consistency distillation (LCM), 4 steps
  diffusion-only    fast generator + adapter finetuned with the diffusion loss, 4 steps
  adversarial-only  fast generator + adapter finetuned with the adversarial loss, 4 steps
  fixed-lambda      fast generator + adapter finetuned with both losses, lambda = 1 throughout
  flashmotion       fast generator + adapter finetuned with both losses, lambda scheduled 10 -> 0.24
"""

import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

import metrics
from adapter import ADAPTERS, CONDITIONS, DEFAULT_CONDITION, Controlled, adapter_from_checkpoint, joint_from_checkpoint
from common import (JOINT_KINDS, UserError, as_user_error, how_to_make, load_checkpoint, parse_flags, pick_device,
                    require_at_least, require_one_of, set_threads)
from model import CONFIGS, fast_generate, generate, model_from_checkpoint
from scenes import scene_batch
from video import check_video_path, draw_boxes, maps_to_uint8, save_video, to_uint8, upscale, video_grid

# name: (generator checkpoint, adapter checkpoint or None, sampler, steps); {adapter} is the adapter family
# and {maps} the maps it reads: "_mask" for mask maps, "" for box maps (the paper's final condition);
# {joint} the family of a jointly distilled pair (dmd-joint, lcm): "" for the ControlNet's, "_lora" or
# "_resnet" for the others'.
# Steps None: the teacher's, 50 unless asked otherwise.
METHODS = {
    "generator": ("slow_generator", None, "euler", None),
    "teacher": ("slow_generator", "slow_adapter_{adapter}{maps}", "euler", None),
    "teacher-4": ("slow_generator", "slow_adapter_{adapter}{maps}", "euler", 4),
    "fast-generator": ("fast_generator", None, "few-step", 4),
    "naive": ("fast_generator", "slow_adapter_{adapter}{maps}", "few-step", 4),
    "dmd-joint": ("dmd_joint{joint}{maps}", None, "few-step", 4),
    "lcm": ("lcm_joint{joint}{maps}", None, "few-step", 4),
    "diffusion-only": ("fast_generator", "fast_adapter_diffusion_{adapter}{maps}", "few-step", 4),
    "adversarial-only": ("fast_generator", "fast_adapter_adversarial_{adapter}{maps}", "few-step", 4),
    "fixed-lambda": ("fast_generator", "fast_adapter_fixed_lambda_{adapter}{maps}", "few-step", 4),
    "flashmotion": ("fast_generator", "fast_adapter_hybrid_{adapter}{maps}", "few-step", 4),
}
TEACHER_STEPS = 50
# --<role>=PATH: a run's own checkpoint (runs/<name>/ckpt.pt or an exported file) replaces the folder's file
# of that role, for every method that uses it; the lineage checks still hold (adapter_from_checkpoint).
ROLES = ("slow_generator", "slow_adapter", "fast_generator", "fast_adapter", *JOINT_KINDS)
ROLE_FLAGS = {role: ("", f"a {role} checkpoint (a run's ckpt.pt, or an export) instead of the folder's")
              for role in ROLES}


@dataclass
class Method:
    name: str
    model: nn.Module   # the generator, or a Controlled (generator + adapter)
    sampler: str       # "euler" (model.generate, with guidance) or "few-step" (model.fast_generate)
    steps: int
    shift: float = None  # few-step: the timestep shift its fast generator was distilled with (its checkpoint's)
    runs: tuple = ()     # the runs of its own checkpoints (--<role>=...), by name (own_runs)

    @property
    def label(self):
        """Its name in what is printed and written: 'naive (lab_slow_adapter)' for a run's own checkpoint."""
        return f"{self.name} ({', '.join(self.runs)})" if self.runs else self.name

    @property
    def controlled(self):
        return isinstance(self.model, Controlled)

    def nfe(self, guidance):
        """Network calls per video: trajectory guidance doubles the Euler steps' calls."""
        return self.steps * (2 if self.sampler == "euler" and self.controlled and guidance != 1 else 1)


def check_family(opt):
    """The flags that pick a set of checkpoints: --config, --adapter, --condition. An
    adapter run given (--slow_adapter=, --fast_adapter=) says which adapter and maps
    themselves; a flag that says otherwise is refused."""
    require_one_of(opt, "config", CONFIGS)
    for role in ("slow_adapter", "fast_adapter"):
        if getattr(opt, role):
            ckpt = load_checkpoint(getattr(opt, role), kind=role)
            for flag, value in (("adapter", ckpt["adapter_config"]["type"]), ("condition", ckpt["condition"])):
                if getattr(opt, flag) not in ("", value):
                    raise UserError(f"--{role}={getattr(opt, role)} is a {value} adapter's run "
                                    f"({flag}), not --{flag}={getattr(opt, flag)}'s")
                setattr(opt, flag, value)
    opt.adapter, opt.condition = opt.adapter or "controlnet", opt.condition or DEFAULT_CONDITION
    require_one_of(opt, "adapter", ADAPTERS)
    require_one_of(opt, "condition", CONDITIONS)


def own_runs(paths, files):
    """The names in outputs of those of a method's checkpoint paths that are one's own (files, by role):
    a run folder's (runs/lab_fast_adapter/ckpt.pt: lab_fast_adapter), or an exported file's."""
    def run_name(path):
        folder, file = os.path.split(os.path.normpath(path))
        return os.path.basename(folder) if file == "ckpt.pt" else os.path.splitext(file)[0]
    return tuple(run_name(path) for path in paths if path in (files or {}).values())


def check_method(name):
    if name not in METHODS:
        raise UserError(f"unknown method '{name}' (known: {', '.join(METHODS)})")


def checkpoint_paths(name, config, adapter_kind, condition=DEFAULT_CONDITION, folder="checkpoints", files=None):
    """The checkpoint files a method needs: [generator] or [generator, adapter];
    files {role: path} (ROLES) in place of the folder's."""
    generator, adapter, _, _ = METHODS[name]
    maps = "_mask" if condition == "mask" else ""
    joint = "" if adapter_kind == "controlnet" else f"_{adapter_kind}"  # the ControlNet's joint pairs: shipped names
    names = [generator.format(maps=maps, joint=joint)] + \
        ([adapter.format(adapter=adapter_kind, maps=maps)] if adapter else [])
    role = lambda n: next(r for r in ROLES if n.startswith(r))
    return [(files or {}).get(role(n)) or os.path.join(folder, f"{n}_{config}.pt") for n in names]


def own_files(opt):
    """The --<role> files given, {role: path}."""
    return {role: getattr(opt, role) for role in ROLES if getattr(opt, role)}


def available_methods(opt):
    """The methods whose checkpoints exist, for the family the flags pick."""
    return [name for name in METHODS if all(os.path.exists(path) for path in checkpoint_paths(
        name, opt.config, opt.adapter, opt.condition, opt.checkpoints, own_files(opt)))]


def load_method(name, config="tiny", adapter_kind="controlnet", condition=DEFAULT_CONDITION, folder="checkpoints",
                device="cpu", teacher_steps=TEACHER_STEPS, files=None):
    """A Method, its networks loaded from `folder` (or `files`, by role) in eval
    mode on `device`; its adapter reads `condition` maps (mask | box)."""
    check_method(name)
    paths = checkpoint_paths(name, config, adapter_kind, condition, folder, files)
    for path in paths:
        if not os.path.exists(path):
            raise UserError(f"method '{name}' needs {path}, which is missing; {how_to_make(path)}")
    generator_name, adapter_name, sampler, steps = METHODS[name]
    joint = next((kind for kind in JOINT_KINDS if generator_name.startswith(kind)), None)
    generator_ckpt = load_checkpoint(paths[0], kind=joint or generator_name)
    with as_user_error():  # checkpoints that do not pair
        model = joint_from_checkpoint(generator_ckpt) if joint else model_from_checkpoint(generator_ckpt)
        if len(paths) == 2:
            stage = "slow_adapter" if adapter_name.startswith("slow_adapter") else "fast_adapter"
            adapter_ckpt = load_checkpoint(paths[1], kind=stage)
            model = Controlled(model, adapter_from_checkpoint(adapter_ckpt, model, generator_ckpt,
                                                              allow_other_generator=name == "naive"))
    if isinstance(model, Controlled) and model.adapter.condition != condition:
        raise UserError(f"{paths[-1]} holds an adapter reading {model.adapter.condition} maps, "
                        f"not the {condition} maps its name promises")
    shift = generator_ckpt["time_shift"] if sampler == "few-step" else None
    return Method(name, model.to(device).eval(), sampler, steps or teacher_steps, shift, own_runs(paths, files))


@torch.no_grad()
def generate_clips(method, scenes, steps=None, guidance=1.0, seed=0, batch_size=8):
    """Generate every scene of a batch (first frame, and the trajectory maps
    the adapter reads) in batches of `batch_size`; batch i's noise is seeded
    with seed + i. Returns (videos (N, T, C, H, W), seconds per video)."""
    model, steps = method.model, steps or method.steps
    videos, seconds = [], 0.0
    for start in range(0, len(scenes["video"]), batch_size):
        first = scenes["video"][start:start + batch_size, 0]
        conditions = {}
        if method.controlled:
            conditions["trajectory"] = model.trajectory(scenes)[start:start + batch_size]
        rng = torch.Generator(device=first.device).manual_seed(seed + start)
        begin = time.perf_counter()
        if method.sampler == "few-step":
            video = fast_generate(model, first, method.shift, rng, **conditions)
        else:
            if method.controlled:
                conditions["uncond"] = {"traj_keep": torch.zeros(len(first), device=first.device)}
            video = generate(model, first, steps=steps, guidance=guidance if method.controlled else 1.0,
                             rng=rng, **conditions)
        seconds += time.perf_counter() - begin
        videos.append(video)
    return torch.cat(videos), seconds / len(scenes["video"])


def sample_frames(method, scene, steps=None, guidance=3.0, seed=0, boxes=True, condition=DEFAULT_CONDITION):
    """What sample.py writes for a scene (a batch of one, data.collate's keys):
    the generated clip, 8x, its target boxes drawn over, beside the maps its
    adapter read (a method without one: the `condition` maps, unread).
    Returns (uint8 frames (T, H, W, 3), seconds of generation, the clip's
    trajectory accuracy (metrics.py) or None for a scene with a first frame
    of its own, whose objects have no colours to find)."""
    device = next(method.model.parameters()).device
    scene = {key: value.to(device) for key, value in scene.items()}
    video, seconds = generate_clips(method, scene, steps, guidance, seed)
    maps = method.model.trajectory(scene) if method.controlled else scene[CONDITIONS[condition]]
    clip = to_uint8(video[0])
    clip = draw_boxes(clip, scene["boxes"][0, :int(scene["n_objects"][0])].cpu().numpy(), 8) if boxes else \
        upscale(clip, 8)
    labels = [method.name, "the maps it read" if method.controlled else "the maps (not read)"]
    drawn = scene["colors"][0, :int(scene["n_objects"][0])].any(-1).all()
    accuracy = metrics.batch_trajectory_accuracy(video.cpu(), {k: v.cpu() for k, v in scene.items()})[0] \
        if drawn else None
    return video_grid([[clip, upscale(maps_to_uint8(maps[0]), 8)]], labels=labels), seconds, accuracy


FLAGS = dict(
    method=("flashmotion", f"one of: {', '.join(METHODS)}"),
    steps=(int, "denoising steps; default the method's own (4 for the fast methods, 50 for the teacher)"),
    scene=("scenes/default.json", "the scene file (scenes.py)"),
    seed=(0, "seed of the noise: the same seed gives the same video"),
    out=("", "the video, .gif or .mp4; default samples/<method>_<scene>[_<adapter>][_<condition>].gif"),
    adapter=("", "controlnet | lora | resnet: the adapter family; default: an adapter run's (--slow_adapter=...), "
                 "else controlnet"),
    condition=("", "mask | box: the maps its adapter reads (box maps: the paper's final condition); default: an "
                   "adapter run's, else mask"),
    guidance=(3.0, "trajectory guidance (CFG) of the Euler methods, as bench.py"),
    config=("tiny", "micro | tiny | small: which checkpoints"),
    checkpoints=("checkpoints", "the folder of the checkpoints"),
    device=("cpu", "cpu | cuda"),
    boxes=(True, "draw the target boxes over the clip"),
    threads=(0, "CPU threads; 0: half the cores (common.set_threads)"),
    **ROLE_FLAGS,
)


def default_out(opt):
    """samples/<method>_<scene>.gif, with whatever is not the default: the adapter family, the maps,
    the runs of one's own checkpoints, the seed, steps and guidance; two different clips, two files."""
    name = os.path.splitext(os.path.basename(opt.scene))[0]
    family = [value for value, default in ((opt.adapter, "controlnet"), (opt.condition, DEFAULT_CONDITION))
              if value != default]
    files = own_files(opt)
    runs = own_runs(checkpoint_paths(opt.method, opt.config, opt.adapter, opt.condition, opt.checkpoints, files), files)
    own_steps = METHODS[opt.method][3] or TEACHER_STEPS
    settings = [("seed", opt.seed, 0), ("steps", opt.steps or own_steps, own_steps)]
    settings += [("guidance", opt.guidance, 3.0)] if METHODS[opt.method][2] == "euler" else []
    settings = [f"{key}{value:g}" for key, value, default in settings if value != default]
    return os.path.join("samples", "_".join([opt.method, name, *family, *runs, *settings]) + ".gif")


def main(argv):
    opt = parse_flags(FLAGS, argv, __doc__)
    check_method(opt.method)
    check_family(opt)
    require_at_least(opt, ("steps",))
    device = pick_device(opt.device)
    if METHODS[opt.method][2] == "few-step" and opt.steps not in (None, 4):
        raise UserError(f"method '{opt.method}' is a 4-step model: --steps must be 4 (or left out)")
    out = opt.out or default_out(opt)
    check_video_path(out)  # before any work: a bad --out loses nothing
    scene = scene_batch([opt.scene], opt.config)  # refuses a bad scene, naming every wrong field
    set_threads(opt.threads)
    method = load_method(opt.method, opt.config, opt.adapter, opt.condition, opt.checkpoints, device,
                         files=own_files(opt))
    frames, seconds, accuracy = sample_frames(method, scene, opt.steps, opt.guidance, opt.seed, opt.boxes,
                                              opt.condition)
    save_video(out, frames)
    followed = "" if accuracy is None else \
        f"mask IoU {accuracy['miou']:.2f}, centre error {accuracy['center_err_px']:.1f} px to the scene's paths; "
    print(f"{method.label}, {opt.steps or method.steps} steps, seed {opt.seed}: {seconds:.2f} s on {device}; "
          f"{followed}wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
