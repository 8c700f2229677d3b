"""Stage 0: pretrain the slow generator, an image-to-video DiT trained with
flow matching on the sprite world (or on a folder of your own clips).

    python train.py                                   # tiny config, CPU or one GPU
    python train.py --config=small --batch_size=64    # one GPU
    torchrun --nproc_per_node=4 train.py --config=small
    python train.py --resume=true                     # continue exactly where it stopped

Every `--key=value` below can be overridden. The checkpoint `out_dir/ckpt.pt`
is written atomically every `ckpt_interval` steps and holds everything needed
to continue bit-for-bit: weights, EMA, optimizer, step. The data and the
noise of step s are pure functions of (seed, rank, s), so they need no state.
"""

import contextlib
import copy
import json
import os
import sys
import time
import uuid

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import model as M
from common import (UserError, autocast, check_ranks_in_sync, cleanup_distributed, ema_update, load_checkpoint,
                    lr_at, noise_seed, open_log, refuse_overwrite, save_checkpoint, script_settings,
                    setup_distributed)

# ---------------------------------------------------------------- config ----
config = "tiny"          # micro | tiny | small (video shape and model size)
out_dir = ""             # default: runs/slow_generator_<config>
data_dir = ""            # a folder of your own clips (see data.ClipFolder); empty: the sprite world
batch_size = 16          # per rank and micro-step
grad_accum = 1           # micro-steps per optimizer step
max_steps = 20000       # length of the lr schedule
stop_at = 0              # stop (with a checkpoint) after this step; resume later. 0: run to max_steps
lr = 5e-4
warmup = 200
weight_decay = 0.01
grad_clip = 1.0
ema_decay = 0.999
cond_drop_prob = 0.1     # first frame dropped this often, for classifier-free guidance
time_shift = M.TIME_SHIFT  # timestep shift of training and sample GIFs (see model.py)
ckpt_interval = 250
sample_interval = 1000   # a GIF of held-out scenes every this many steps (0: never)
sample_steps = 50
sample_cfg = 1.0         # guidance of the sample GIFs (measured: 1.5 and 2.0 were worse at tiny)
num_workers = 1          # data processes per rank
seed = 0
compile = torch.cuda.is_available()
resume = False
# ------------------------------------------------------------------------------
settings = script_settings(globals(), sys.argv[1:])
globals().update(settings)
if config not in data.CONFIGS:
    raise UserError(f"--config must be one of {', '.join(data.CONFIGS)}")
for key in ("batch_size", "grad_accum", "max_steps", "ckpt_interval"):
    if settings[key] < 1:
        raise UserError(f"--{key} must be at least 1")
out_dir = out_dir or f"runs/slow_generator_{config}"
ckpt_path = os.path.join(out_dir, "ckpt.pt")

rank, world_size, device = setup_distributed()
master = rank == 0
torch.manual_seed(seed)  # identical initial weights on every rank

# ------------------------------------------------------------------ setup ---
raw_model = M.build_model(config).to(device)
ema_model = copy.deepcopy(raw_model).requires_grad_(False).eval()
optimizer = torch.optim.AdamW(raw_model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=weight_decay)
step, run_id = 0, uuid.uuid4().hex[:12]
refuse_overwrite(ckpt_path, resume)
if os.path.exists(ckpt_path):
    ckpt = load_checkpoint(ckpt_path, kind="slow_generator", map_location=device)
    if ckpt["model_config"] != M.config_dict(raw_model):
        raise UserError(f"{ckpt_path} was trained with another model config: {ckpt['model_config']}")
    raw_model.load_state_dict(ckpt["model"])
    ema_model.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    step, run_id = ckpt["step"], ckpt["run_id"]
    del ckpt
elif resume and master:
    print(f"no checkpoint at {ckpt_path}: starting from scratch")
n_params = sum(p.numel() for p in raw_model.parameters())
if master:
    print(f"slow generator '{config}': {n_params / 1e6:.2f}M parameters, tokens {raw_model.grid}, "
          f"device {device}, {world_size} rank(s), step {step}/{max_steps}")

# Compile after loading, before the DDP wrap (nanoGPT's order); save raw_model.
train_model = torch.compile(raw_model) if compile else raw_model
if world_size > 1:
    train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)

shape = data.CONFIGS[config]
# Batch i of this rank is a pure function of (seed, rank, i): resuming at
# step s starts the stream at micro-batch s * grad_accum.
stream_args = dict(batch_size=batch_size, seed=seed, rank=rank, start=step * grad_accum)
stream = (data.ClipFolder(data_dir, **shape, **stream_args) if data_dir
          else data.SpriteWorld(**shape, **stream_args))
batches = iter(DataLoader(stream, batch_size=None, num_workers=num_workers,
                          persistent_workers=num_workers > 0))
noise_gen = torch.Generator(device=device)


def save():
    check_ranks_in_sync(raw_model)  # all ranks take part; only rank 0 writes
    if master:
        save_checkpoint(ckpt_path, {
            "kind": "slow_generator", "run_id": run_id, "parent": None, "step": step,
            "model_config": M.config_dict(raw_model), "train_config": settings,
            "model": raw_model.state_dict(), "ema": ema_model.state_dict(),
            "optimizer": optimizer.state_dict(),
        })


def write_samples():
    """Held-out scenes: ground truth with its boxes | EMA model's video from the same first frame."""
    held_out = data.SpriteWorld(**shape, batch_size=4, seed=data.HELD_OUT_SEED).batch(0)
    video = held_out["video"].to(device)
    with autocast(device):
        generated = M.generate(ema_model, video[:, 0], steps=sample_steps, shift=time_shift,
                               cfg_scale=sample_cfg, generator=torch.Generator(device=device).manual_seed(0))
    rows = []
    for i in range(len(video)):
        boxes = held_out["boxes"][i, :int(held_out["n_objects"][i])].numpy()
        rows.append([data.draw_boxes(data.to_uint8(video[i]), boxes, 4),
                     data.draw_boxes(data.to_uint8(generated[i]), boxes, 4)])
    path = os.path.join(out_dir, "samples", f"step_{step:06d}.gif")
    data.save_video(path, data.video_grid(rows))
    return path


# ------------------------------------------------------------------- loop ---
end_step = min(stop_at or max_steps, max_steps)
os.makedirs(out_dir, exist_ok=True)
log = open_log(out_dir, step) if master else None
bar = tqdm(total=end_step, initial=step, disable=not master, desc="stage 0", dynamic_ncols=True)
raw_model.train()
last_time = time.time()
while step < end_step:
    lr_now = lr_at(step, lr, warmup, max_steps)
    for group in optimizer.param_groups:
        group["lr"] = lr_now
    loss_sum = 0.0
    for micro in range(grad_accum):
        batch = next(batches)
        video = batch["video"].to(device, non_blocking=True)  # (B, T, C, H, W)
        noise_gen.manual_seed(noise_seed(seed, rank, step * grad_accum + micro))
        # DDP all-reduces gradients only on the last micro-step.
        sync = contextlib.nullcontext() if world_size == 1 or micro == grad_accum - 1 else train_model.no_sync()
        with sync, autocast(device):
            loss = M.flow_matching_loss(train_model, video, video[:, 0], noise_gen, cond_drop_prob,
                                        shift=time_shift)
        (loss / grad_accum).backward()
        loss_sum += loss.item() / grad_accum
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), grad_clip).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    ema_update(ema_model, raw_model, min(ema_decay, (1 + step) / (10 + step)))
    step += 1

    now = time.time()
    samples_per_s = batch_size * grad_accum * world_size / (now - last_time)
    last_time = now
    bar.update(1)
    bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr_now:.1e}", sps=f"{samples_per_s:.1f}")
    if master:
        log.write(json.dumps({"step": step, "loss": round(loss_sum, 5), "grad_norm": round(grad_norm, 4),
                              "lr": lr_now, "samples_per_s": round(samples_per_s, 2),
                              "time": round(now, 1)}) + "\n")
        log.flush()
    if step % ckpt_interval == 0 or step == end_step:
        save()
    if master and sample_interval and (step % sample_interval == 0 or step == end_step):
        bar.write(f"step {step}: samples in {write_samples()}")
bar.close()
if master:
    print(f"{'done' if step == max_steps else 'stopped'}: {ckpt_path} at step {step}/{max_steps}")
cleanup_distributed()
