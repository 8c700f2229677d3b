"""Stage 1: train a trajectory adapter (adapter.py) on the frozen slow generator.

The loss is the generator's own flow-matching loss, now with the trajectory
maps as a condition: the adapter learns what the generator needs to be told
so that each object follows its masks (or boxes). The trajectory is dropped
for a fraction of the samples (maps zeroed, presence flag 0), so that
classifier-free guidance on the trajectory works at sampling.

    python train_adapter.py                  # the shipped mask ControlNet: the box one, 600 steps on mask maps
    python train_adapter.py --adapter=lora   # the same for the LoRA adapter
    python train_adapter.py --recipe=resnet  # the paper's ResNet adapter on mask maps, from scratch
    python train_adapter.py --condition=box --mask_first=0.46 --max_steps=4000 --lr=5e-4 --warmup=100
                                             # the box adapter: mask maps for 46% of the steps, then box maps
    torchrun --nproc_per_node=4 train_adapter.py --config=small --generator_ckpt=runs/slow_generator_small/ckpt.pt
    python train_adapter.py --resume=true

The checkpoint names the generator run it was trained on (loading it onto
another generator fails with a clear message) and the maps it reads.
"""

import copy
import sys

import torch

import data
import metrics
from adapter import (ADAPTERS, CONDITIONS, DEFAULT_CONDITION, LORA_RANK, Controlled, adapter_from_checkpoint,
                     build_adapter)
from common import (Run, UserError, as_user_error, autocast, clipped_step, ema_decay_at, ema_update, load_checkpoint,
                    lr_at, noise_seed, parse_flags, require_at_least, require_one_of, set_lr)
from model import CONFIGS, config_dict, flow_matching_loss, generate, model_from_checkpoint
from video import comparison_video, save_video

FLAGS = dict(
    config=("tiny", "micro | tiny | small: must match the generator"),
    generator_ckpt=("", "the slow generator; default checkpoints/slow_generator_<config>.pt"),
    adapter=("controlnet", "controlnet | lora | resnet (the paper's lightweight adapter: --recipe=resnet)"),
    condition=(DEFAULT_CONDITION, "mask | box: which trajectory maps steer the objects"),
    mask_first=(0.0, "with box maps: read mask maps for this share of the steps first (the paper: masks, then boxes)"),
    max_free=(0, "each training scene also holds 0 to this many free objects, which no map shows (data.random_scene)"),
    init_from=("", "start from this adapter checkpoint's EMA weights (same kind, same generator; its maps may "
                   "differ); default with mask maps: the box adapter checkpoints/slow_adapter_<adapter>_<config>.pt; "
                   "none: from scratch"),
    controlnet_blocks=(0, "blocks copied into the ControlNet; 0: half the generator's depth"),
    lora_rank=(LORA_RANK, "rank of the LoRA updates"),
    out_dir=("", "default runs/slow_adapter_<adapter>[_mask]_<config>"),
    batch_size=(32, "clips per rank and step"),
    max_steps=(600, "length of the lr schedule"),
    stop_at=(0, "stop (with a checkpoint) after this step, to resume later; 0: run to max_steps"),
    time_limit=(0.0, "minutes: stop (with a checkpoint) after this long, to resume later; 0: no limit"),
    lr=(2e-4, "peak learning rate"),
    warmup=(50, "linear warmup steps"),
    weight_decay=(0.0, "AdamW weight decay"),
    grad_clip=(1.0, "gradient norm clip"),
    ema_decay=(0.995, "EMA of the adapter weights, what is exported"),
    traj_drop_prob=(0.1, "trajectory dropped this often, for classifier-free guidance"),
    ckpt_interval=(100, "checkpoint every this many steps"),
    sample_interval=(300, "held-out mIoU and a GIF every this many steps (0: never)"),
    sample_steps=(50, "Euler steps of the held-out samples"),
    sample_guidance=(1.0, "trajectory guidance of the held-out samples"),
    eval_scenes=(16, "held-out scenes measured"),
    num_workers=(1, "data processes per rank"),
    seed=(0, "seed of weights, data and noise"),
    threads=(0, "CPU threads of this process; 0: every core (PyTorch's default)"),
    compile=(torch.cuda.is_available(), "torch.compile the training model (default on CUDA)"),
    resume=(False, "continue the run in out_dir"),
    recipe=("", "a named flag set of RECIPES below: lab, the course's 10-minute run (docs/course.md)"),
)
RECIPES = {"small": dict(max_steps=1500),  # --config=small
           # --recipe=lab: docs/course.md, lab 3: a mask ControlNet from scratch in 10 minutes on one CPU thread
           "lab": dict(threads=1, init_from="none", batch_size=8, max_steps=450, lr=5e-4, sample_interval=150,
                       eval_scenes=8, sample_steps=20, num_workers=0, out_dir="runs/lab_slow_adapter"),
           # --recipe=resnet: the paper's lightweight adapter on mask maps, from scratch on the box adapters' schedule
           "resnet": dict(adapter="resnet", init_from="none", max_steps=4000, lr=5e-4, warmup=100, sample_interval=500)}


@torch.no_grad()
def held_out(model, scenes, steps, guidance=1.0, use_adapter=True):
    """Generate the held-out scenes with `model` (a Controlled) and measure
    trajectory accuracy: (videos, mean metrics). use_adapter False gives the
    plain generator on the same noise."""
    device = next(model.parameters()).device
    first = scenes["video"][:, 0].to(device)
    conditions = {}
    if use_adapter:
        conditions = dict(trajectory=model.trajectory(scenes).to(device),
                          uncond={"traj_keep": torch.zeros(len(first), device=device)})
    with autocast(device):
        videos = generate(model, first, steps=steps, guidance=guidance if use_adapter else 1.0,
                          rng=torch.Generator(device=device).manual_seed(0), **conditions)
    return videos.float().cpu(), metrics.mean_of(metrics.batch_trajectory_accuracy(videos.cpu(), scenes))


def check_flags(opt):
    """Refuse wrong flags, and fill in the defaults that depend on others."""
    require_one_of(opt, "config", CONFIGS)
    require_one_of(opt, "condition", CONDITIONS)
    require_one_of(opt, "adapter", ADAPTERS)
    require_at_least(opt, ("batch_size", "max_steps", "ckpt_interval", "eval_scenes"))
    if not 0 <= opt.mask_first < 1 or (opt.mask_first and opt.condition != "box"):
        raise UserError(f"--mask_first must be in [0, 1), and 0 unless --condition=box; got {opt.mask_first}")
    opt.generator_ckpt = opt.generator_ckpt or f"checkpoints/slow_generator_{opt.config}.pt"
    if not opt.init_from:  # a mask adapter continues the box one (it already read mask maps for --mask_first)
        opt.init_from = f"checkpoints/slow_adapter_{opt.adapter}_{opt.config}.pt" if opt.condition == "mask" else "none"
    maps = "_mask" if opt.condition == "mask" else ""
    opt.out_dir = opt.out_dir or f"runs/slow_adapter_{opt.adapter}{maps}_{opt.config}"


def adapters(opt, run, generator, parent):
    """The adapter to train and its EMA: fresh, or warm from --init_from, or as the run left them."""
    flag, options = {"controlnet": ("--controlnet_blocks", dict(blocks=opt.controlnet_blocks)),
                     "lora": ("--lora_rank", dict(rank=opt.lora_rank)), "resnet": ("--adapter", {})}[opt.adapter]
    with as_user_error(flag):
        adapter = build_adapter(opt.adapter, generator, opt.condition, **options)
    adapter = adapter.to(run.device)
    ema_adapter = copy.deepcopy(adapter).requires_grad_(False)
    saved = run.saved
    if saved is not None and (saved["parent"] != parent["run_id"] or saved["adapter_config"] != adapter.config()
                              or saved["condition"] != opt.condition):
        raise UserError(f"{run.path} is a {saved['adapter_config']} adapter reading {saved['condition']} "
                        f"maps, of generator run {saved['parent']}; this run asks for {adapter.config()} "
                        f"reading {opt.condition} maps on run {parent['run_id']}")
    if opt.init_from != "none" and saved is None:
        # The adapter is the same network whichever maps it reads (--mask_first switches them mid-run),
        # so a box adapter is a warm start for a mask one.
        source = load_checkpoint(opt.init_from, kind="slow_adapter")
        if source["adapter_config"] != adapter.config():
            raise UserError(f"--init_from={opt.init_from} is a {source['adapter_config']} adapter; "
                            f"this run builds {adapter.config()}")
        with as_user_error("--init_from"):  # refuses another generator's adapter
            warm = adapter_from_checkpoint(source, generator, parent).state_dict()
        adapter.load_state_dict(warm)
        ema_adapter.load_state_dict(warm)
    return adapter, ema_adapter


def main(argv):
    opt = parse_flags(FLAGS, argv, __doc__, RECIPES)
    check_flags(opt)
    run = Run(opt, kind="slow_adapter")
    device = run.device

    parent = load_checkpoint(opt.generator_ckpt, kind="slow_generator")
    generator = model_from_checkpoint(parent).to(device).requires_grad_(False).eval()
    if data.video_shape(generator.cfg) != data.video_shape(opt.config):
        raise UserError(f"{opt.generator_ckpt} is not a '{opt.config}' generator: {parent['model_config']}")
    adapter, ema_adapter = adapters(opt, run, generator, parent)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=opt.lr, betas=(0.9, 0.99), weight_decay=opt.weight_decay)
    run.restore(model=adapter, ema=ema_adapter, optimizer=optimizer)
    if run.master:
        print(f"{opt.adapter} adapter ({opt.condition} maps): "
              f"{sum(p.numel() for p in adapter.parameters()) / 1e6:.2f}M trainable parameters on the frozen "
              f"generator {opt.generator_ckpt}, device {device}, {run.world_size} rank(s), "
              f"step {run.step}/{opt.max_steps}")
    train_model = run.wrap(Controlled(generator, adapter))
    ema_model = Controlled(generator, ema_adapter)

    shape = data.video_shape(opt.config)
    batches = run.batches(data.SpriteWorld(**shape, batch_size=opt.batch_size, seed=opt.seed, rank=run.rank,
                                           start=run.step, max_free=opt.max_free))
    rng = torch.Generator(device=device)
    scenes = data.SpriteWorld(**shape, batch_size=opt.eval_scenes, seed=data.HELD_OUT_SEED).batch(0)
    baseline = None  # the generator alone on the held-out scenes, measured once

    def evaluate():
        """Held-out trajectory accuracy without and with the (EMA) adapter, and a GIF:
        target | generator alone | with the adapter, target boxes drawn over."""
        nonlocal baseline
        if baseline is None:
            baseline = held_out(ema_model, scenes, opt.sample_steps, use_adapter=False)
        videos, accuracy = held_out(ema_model, scenes, opt.sample_steps, opt.sample_guidance)
        save_video(run.sample_path(),
                   comparison_video(scenes, [baseline[0], videos], range(min(4, opt.eval_scenes)),
                                    ["no adapter", "adapter"]))
        return {"no_adapter": baseline[1], "adapter": accuracy}

    adapter.train()
    for step in run.steps(f"stage 1 {opt.adapter}"):
        lr = set_lr(optimizer, lr_at(step, opt.lr, opt.warmup, opt.max_steps))
        batch = next(batches)
        video = generator.encode(batch["video"].to(device, non_blocking=True))  # (B, *generator.space)
        # Masks first, then boxes: the mask maps show each object's exact shape and place; the box maps,
        # read afterwards, are what a user draws. The adapter keeps the box condition.
        maps = "mask" if step < opt.mask_first * opt.max_steps else opt.condition
        trajectory = batch[CONDITIONS[maps]].to(device, non_blocking=True)  # (B, T, 3, H, W) pixels
        rng.manual_seed(noise_seed(opt.seed, run.rank, step))
        traj_keep = (torch.rand(len(video), generator=rng, device=device) >= opt.traj_drop_prob).float()
        with autocast(device):
            loss = flow_matching_loss(train_model, video, video[:, 0], rng, trajectory=trajectory,
                                      traj_keep=traj_keep)
        loss.backward()
        grad_norm = clipped_step(optimizer, adapter, opt.grad_clip)
        ema_update(ema_adapter, adapter, ema_decay_at(step, opt.ema_decay))

        record = {"loss": round(loss.item(), 5), "grad_norm": round(grad_norm, 4), "lr": lr, "maps": maps}
        if run.master and run.due(opt.sample_interval):
            record["held_out"] = evaluate()
            run.write(metrics.versus(record["held_out"]["adapter"], record["held_out"]["no_adapter"],
                                     "generator alone"))
        run.log(record, clips=opt.batch_size)
        if run.due(opt.ckpt_interval):
            run.save(adapter, parent=parent["run_id"], parent_path=opt.generator_ckpt,
                     generator_config=config_dict(generator), adapter_config=adapter.config(),
                     condition=opt.condition, model=adapter.state_dict(), ema=ema_adapter.state_dict(),
                     optimizer=optimizer.state_dict())
            run.draw_curves()


if __name__ == "__main__":
    main(sys.argv[1:])
