"""Stage 1: trajectory adapters, trained on the frozen slow generator.

An adapter reads trajectory maps (data.trajectory_maps: boxes or masks drawn
in ID colours, one map per frame) and steers the generator so that the
objects of the first frame follow them. FlashMotion is shown on two adapter
families; so are we:

  controlnet  a trainable copy of the generator's first K blocks reads the
              noisy video tokens plus the trajectory tokens; each copied
              block's output goes through a zero-initialised linear layer
              and is added after the matching frozen block (MagicMotion's
              trajectory ControlNet);
  lora        a small trajectory encoder whose tokens are added to the
              generator's input tokens (zero-initialised), plus low-rank
              updates of every attention projection (B zero-initialised).

Both start as exactly the generator. The trajectory is dropped for a
fraction of the training samples (maps zeroed, presence flag 0), so that
classifier-free guidance on the trajectory works at sampling.

    python adapter.py                                  # ControlNet on checkpoints/slow_generator_tiny.pt
    python adapter.py --adapter=lora --condition=mask
    torchrun --nproc_per_node=4 adapter.py --config=small --generator_ckpt=runs/slow_generator_small/ckpt.pt
    python adapter.py --resume=true

The checkpoint names the generator checkpoint it was trained on; loading it
onto another generator fails with a clear message.
"""

import copy
import json
import os
import sys
import time
import uuid
from types import SimpleNamespace

import torch
import torch.nn as nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

import data
import metrics
import model as M
from common import (UserError, autocast, check_ranks_in_sync, cleanup_distributed, ema_update, load_checkpoint,
                    apply_overrides, lr_at, noise_seed, open_log, refuse_overwrite, save_checkpoint,
                    setup_distributed)

ADAPTERS = ("controlnet", "lora")
CONDITIONS = {"box": "box_maps", "mask": "mask_maps"}


# ------------------------------------------------------------- adapters ----

def trajectory_channels(trajectory, traj_keep):
    """Maps (B, T, 3, H, W) and a presence flag: (B, T, 4, H, W). traj_keep
    (B,) is 0 where the trajectory is dropped (maps zeroed, flag 0): an empty
    map alone would mean "no object anywhere", not "no condition"."""
    B, T, _, H, W = trajectory.shape
    if traj_keep is None:
        traj_keep = torch.ones(B, device=trajectory.device)
    keep = traj_keep.to(trajectory.dtype).view(B, 1, 1, 1, 1)
    return torch.cat([trajectory * keep, keep.expand(B, T, 1, H, W)], dim=2)


class ControlNetAdapter(nn.Module):
    def __init__(self, generator, blocks=0):
        super().__init__()
        cfg = generator.cfg
        self.n_blocks = blocks or cfg.depth // 2
        if not 1 <= self.n_blocks <= cfg.depth:
            raise UserError(f"--controlnet_blocks must be between 1 and the generator's depth {cfg.depth}")
        patch = cfg.patch_t * cfg.patch_hw ** 2
        self.trajectory_embed = zero_linear(4 * patch, cfg.dim)
        # Initialised from the generator: the copy starts out knowing the video.
        self.blocks = copy.deepcopy(generator.blocks[:self.n_blocks]).requires_grad_(True)
        self.outputs = nn.ModuleList(zero_linear(cfg.dim, cfg.dim) for _ in range(self.n_blocks))

    def config(self):
        return {"type": "controlnet", "blocks": self.n_blocks}

    def forward(self, generator, x_t, t, first_frame, trajectory, keep=None, traj_keep=None, **hooks):
        tokens, c = generator.embed(x_t, t, first_frame, keep)  # (B, N, dim), (B, dim)
        h = tokens + self.trajectory_embed(generator.patchify(trajectory_channels(trajectory, traj_keep)))
        residuals = []
        for block, output in zip(self.blocks, self.outputs):
            h = block(h, c, generator.rope)
            residuals.append(output(h))
        residuals += [None] * (generator.cfg.depth - self.n_blocks)
        return generator(x_t, t, first_frame, keep, block_residuals=residuals, **hooks)


class LoRAAdapter(nn.Module):
    TARGETS = ("qkv", "proj")  # the attention projections of every block

    def __init__(self, generator, rank=16):
        super().__init__()
        cfg = generator.cfg
        self.rank = rank
        if rank < 1:
            raise UserError("--lora_rank must be at least 1")
        patch = cfg.patch_t * cfg.patch_hw ** 2
        self.encoder = nn.Sequential(nn.Linear(4 * patch, cfg.dim), nn.GELU(approximate="tanh"),
                                     zero_linear(cfg.dim, cfg.dim))
        self.names = [f"blocks.{i}.attn.{target}.weight" for i in range(cfg.depth) for target in self.TARGETS]
        weights = dict(generator.named_parameters())
        # delta W = B A: A random, B zero, so the update starts at exactly zero.
        self.lora_a = nn.ParameterList(nn.Parameter(torch.randn(rank, weights[n].shape[1]) / weights[n].shape[1] ** 0.5)
                                       for n in self.names)
        self.lora_b = nn.ParameterList(nn.Parameter(torch.zeros(weights[n].shape[0], rank)) for n in self.names)

    def config(self):
        return {"type": "lora", "rank": self.rank}

    def forward(self, generator, x_t, t, first_frame, trajectory, keep=None, traj_keep=None, **hooks):
        tokens = self.encoder(generator.patchify(trajectory_channels(trajectory, traj_keep)))  # (B, N, dim)
        weights = dict(generator.named_parameters())
        updated = {n: weights[n] + b @ a for n, a, b in zip(self.names, self.lora_a, self.lora_b)}
        # The generator runs with its attention weights swapped for W + B A;
        # the generator module itself is never modified.
        return functional_call(generator, updated, (x_t, t, first_frame),
                               dict(keep=keep, token_residual=tokens, **hooks))


def zero_linear(d_in, d_out):
    layer = nn.Linear(d_in, d_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def build_adapter(kind, generator, blocks=0, rank=16):
    if kind == "controlnet":
        return ControlNetAdapter(generator, blocks)
    if kind == "lora":
        return LoRAAdapter(generator, rank)
    raise UserError(f"--adapter must be one of {', '.join(ADAPTERS)}, got '{kind}'")


class Controlled(nn.Module):
    """A generator steered by an adapter, called like the generator itself
    (so model.generate, DMD and the discriminator take it as is). Without a
    trajectory it is the plain generator."""

    def __init__(self, generator, adapter):
        super().__init__()
        self.generator, self.adapter = generator, adapter

    @property
    def cfg(self):
        return self.generator.cfg

    def forward(self, x_t, t, first_frame, keep=None, trajectory=None, traj_keep=None, **hooks):
        if trajectory is None:
            return self.generator(x_t, t, first_frame, keep, **hooks)
        return self.adapter(self.generator, x_t, t, first_frame, trajectory, keep, traj_keep, **hooks)


def adapter_from_checkpoint(ckpt, generator, generator_ckpt, use_ema=True, allow_other_generator=False):
    """Rebuild an adapter onto `generator` (loaded from `generator_ckpt`).
    An adapter is trained against one generator: plugging it into another
    is refused unless asked for (the `naive` pairing does so on purpose)."""
    if not allow_other_generator and ckpt["parent"] != generator_ckpt["run_id"]:
        raise UserError(f"this adapter was trained on the generator checkpoint '{ckpt['parent_path']}' "
                        f"(run {ckpt['parent']}), not on run {generator_ckpt['run_id']} "
                        f"('{generator_ckpt['kind']}'); load the generator it was trained on")
    if ckpt["generator_config"] != M.config_dict(generator):
        raise UserError(f"adapter made for generator config {ckpt['generator_config']}, got {M.config_dict(generator)}")
    config = ckpt["adapter_config"]
    adapter = build_adapter(config["type"], generator, blocks=config.get("blocks", 0), rank=config.get("rank", 16))
    adapter.load_state_dict(ckpt["ema" if use_ema else "model"])
    return adapter


@torch.no_grad()
def held_out_accuracy(model, scenes, condition, steps, cfg_scale=1.0, use_adapter=True, seed=0):
    """Generate the held-out scenes with `model` (a Controlled) and measure
    trajectory accuracy: (videos, mean metrics). use_adapter False gives the
    plain generator on the same noise."""
    device = next(model.parameters()).device
    first = scenes["video"][:, 0].to(device)
    conditions = {}
    if use_adapter:
        trajectory = scenes[CONDITIONS[condition]].to(device)
        conditions = dict(trajectory=trajectory, uncond={"traj_keep": torch.zeros(len(first), device=device)})
    with autocast(device):
        videos = M.generate(model, first, steps=steps, cfg_scale=cfg_scale if use_adapter else 1.0,
                            generator=torch.Generator(device=device).manual_seed(seed), **conditions)
    return videos.float().cpu(), metrics.mean_of(metrics.batch_trajectory_accuracy(videos.cpu(), scenes))


def main(argv):
    # ------------------------------------------------------------ config ----
    opt = SimpleNamespace(**apply_overrides(dict(
        config="tiny",            # micro | tiny | small: must match the generator
        generator_ckpt="",        # default: checkpoints/slow_generator_<config>.pt
        adapter="controlnet",     # controlnet | lora
        condition="box",          # box | mask: which trajectory maps steer the objects
        controlnet_blocks=0,      # blocks copied into the ControlNet; 0: half the generator's depth
        lora_rank=16,
        out_dir="",               # default: runs/slow_adapter_<adapter>_<config>
        batch_size=16,
        max_steps=4000,
        stop_at=0,                # stop (with a checkpoint) after this step; resume later
        lr=5e-4,
        warmup=100,
        weight_decay=0.0,
        grad_clip=1.0,
        ema_decay=0.995,
        traj_drop_prob=0.1,       # trajectory dropped this often, for classifier-free guidance
        ckpt_interval=100,
        sample_interval=500,      # held-out mIoU and a GIF every this many steps (0: never)
        sample_steps=50,
        sample_cfg=1.0,           # trajectory guidance of the held-out samples
        eval_scenes=16,
        num_workers=1,
        seed=0,
        compile=torch.cuda.is_available(),
        resume=False,
    ), argv))
    # ------------------------------------------------------------------------
    if opt.config not in data.CONFIGS:
        raise UserError(f"--config must be one of {', '.join(data.CONFIGS)}")
    if opt.condition not in CONDITIONS:
        raise UserError(f"--condition must be one of {', '.join(CONDITIONS)}, got '{opt.condition}'")
    if opt.adapter not in ADAPTERS:
        raise UserError(f"--adapter must be one of {', '.join(ADAPTERS)}, got '{opt.adapter}'")
    for key in ("batch_size", "max_steps", "ckpt_interval", "eval_scenes"):
        if getattr(opt, key) < 1:
            raise UserError(f"--{key} must be at least 1")
    opt.generator_ckpt = opt.generator_ckpt or f"checkpoints/slow_generator_{opt.config}.pt"
    opt.out_dir = opt.out_dir or f"runs/slow_adapter_{opt.adapter}_{opt.config}"
    ckpt_path = os.path.join(opt.out_dir, "ckpt.pt")
    refuse_overwrite(ckpt_path, opt.resume)

    rank, world_size, device = setup_distributed()
    master = rank == 0
    torch.manual_seed(opt.seed)

    # -------------------------------------------------------------- setup ---
    parent = load_checkpoint(opt.generator_ckpt, kind="slow_generator")
    generator = M.model_from_checkpoint(parent).to(device).requires_grad_(False).eval()
    if M.config_dict(generator) != M.config_dict(M.build_model(opt.config)):
        raise UserError(f"{opt.generator_ckpt} is not a '{opt.config}' generator: {parent['model_config']}")
    raw_adapter = build_adapter(opt.adapter, generator, opt.controlnet_blocks, opt.lora_rank).to(device)
    ema_adapter = copy.deepcopy(raw_adapter).requires_grad_(False)
    optimizer = torch.optim.AdamW(raw_adapter.parameters(), lr=opt.lr, betas=(0.9, 0.99), weight_decay=opt.weight_decay)
    step, run_id = 0, uuid.uuid4().hex[:12]
    if os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path, kind="slow_adapter", map_location=device)
        if ckpt["parent"] != parent["run_id"] or ckpt["adapter_config"] != raw_adapter.config():
            raise UserError(f"{ckpt_path} is a {ckpt['adapter_config']} adapter of generator run {ckpt['parent']}; "
                            f"this run asks for {raw_adapter.config()} on run {parent['run_id']}")
        raw_adapter.load_state_dict(ckpt["model"])
        ema_adapter.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, run_id = ckpt["step"], ckpt["run_id"]
        del ckpt
    n_params = sum(p.numel() for p in raw_adapter.parameters())
    if master:
        print(f"{opt.adapter} adapter ({opt.condition} maps): {n_params / 1e6:.2f}M trainable parameters on the frozen "
              f"generator {opt.generator_ckpt}, device {device}, {world_size} rank(s), step {step}/{opt.max_steps}")

    train_model = Controlled(generator, raw_adapter)
    if opt.compile:
        train_model = torch.compile(train_model)
    if world_size > 1:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)
    ema_model = Controlled(generator, ema_adapter)

    shape = data.CONFIGS[opt.config]
    stream = data.SpriteWorld(**shape, batch_size=opt.batch_size, seed=opt.seed, rank=rank, start=step)
    batches = iter(DataLoader(stream, batch_size=None, num_workers=opt.num_workers,
                              persistent_workers=opt.num_workers > 0))
    noise_gen = torch.Generator(device=device)
    scenes = data.SpriteWorld(**shape, batch_size=opt.eval_scenes, seed=data.HELD_OUT_SEED).batch(0)
    baseline = None  # the generator alone on the held-out scenes, measured once

    def save():
        check_ranks_in_sync(raw_adapter)
        if master:
            save_checkpoint(ckpt_path, {
                "kind": "slow_adapter", "run_id": run_id, "parent": parent["run_id"],
                "parent_path": opt.generator_ckpt, "generator_config": M.config_dict(generator),
                "adapter_config": raw_adapter.config(), "condition": opt.condition, "step": step,
                "train_config": vars(opt), "model": raw_adapter.state_dict(), "ema": ema_adapter.state_dict(),
                "optimizer": optimizer.state_dict(),
            })

    def evaluate():
        """Held-out trajectory accuracy without and with the (EMA) adapter, and a GIF:
        target | generator alone | with the adapter, target boxes drawn over."""
        nonlocal baseline
        if baseline is None:
            baseline = held_out_accuracy(ema_model, scenes, opt.condition, opt.sample_steps, use_adapter=False)
        videos, accuracy = held_out_accuracy(ema_model, scenes, opt.condition, opt.sample_steps, opt.sample_cfg)
        rows = []
        for i in range(min(4, opt.eval_scenes)):
            boxes = scenes["boxes"][i, :int(scenes["n_objects"][i])].numpy()
            rows.append([data.draw_boxes(data.to_uint8(v[i]), boxes, 4)
                         for v in (scenes["video"], baseline[0], videos)])
        data.save_video(os.path.join(opt.out_dir, "samples", f"step_{step:06d}.gif"), data.video_grid(rows))
        return {"no_adapter": baseline[1], "adapter": accuracy}

    # --------------------------------------------------------------- loop ---
    end_step = min(opt.stop_at or opt.max_steps, opt.max_steps)
    os.makedirs(opt.out_dir, exist_ok=True)
    log = open_log(opt.out_dir, step) if master else None
    bar = tqdm(total=end_step, initial=step, disable=not master, desc=f"stage 1 {opt.adapter}", dynamic_ncols=True)
    raw_adapter.train()
    last_time = time.time()
    while step < end_step:
        lr_now = lr_at(step, opt.lr, opt.warmup, opt.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        batch = next(batches)
        video = batch["video"].to(device, non_blocking=True)  # (B, T, C, H, W)
        trajectory = batch[CONDITIONS[opt.condition]].to(device, non_blocking=True)  # (B, T, 3, H, W)
        noise_gen.manual_seed(noise_seed(opt.seed, rank, step))
        traj_keep = (torch.rand(len(video), generator=noise_gen, device=device) >= opt.traj_drop_prob).float()
        with autocast(device):
            loss = M.flow_matching_loss(train_model, video, video[:, 0], noise_gen, trajectory=trajectory,
                                        traj_keep=traj_keep)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_adapter.parameters(), opt.grad_clip).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(ema_adapter, raw_adapter, min(opt.ema_decay, (1 + step) / (10 + step)))
        step += 1

        now = time.time()
        samples_per_s = opt.batch_size * world_size / (now - last_time)
        last_time = now
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_now:.1e}", sps=f"{samples_per_s:.1f}")
        record = {"step": step, "loss": round(loss.item(), 5), "grad_norm": round(grad_norm, 4), "lr": lr_now,
                  "samples_per_s": round(samples_per_s, 2), "time": round(now, 1)}
        if step % opt.ckpt_interval == 0 or step == end_step:
            save()
        if master and opt.sample_interval and (step % opt.sample_interval == 0 or step == end_step):
            record["held_out"] = evaluate()
            a, b = record["held_out"]["adapter"], record["held_out"]["no_adapter"]
            bar.write(f"step {step}: held-out mIoU {a['miou']:.3f} (generator alone {b['miou']:.3f}), "
                      f"centre error {a['center_err_px']:.2f}px ({b['center_err_px']:.2f}px)")
        if master:
            log.write(json.dumps(record) + "\n")
            log.flush()
    bar.close()
    if master:
        print(f"{'done' if step == opt.max_steps else 'stopped'}: {ckpt_path} at step {step}/{opt.max_steps}")
    cleanup_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
