"""The trajectory adapters, the `Controlled` wrapper, and loading them.

An adapter reads trajectory maps (data.trajectory_maps: boxes or masks drawn
in ID colours, one map per frame) and steers the generator so that the
objects of the first frame follow them. FlashMotion is shown on a ControlNet
and on a lightweight ResNet adapter; we have both, and a LoRA:

  controlnet  a trainable copy of the generator's first K blocks reads the
              noisy video tokens plus the trajectory tokens; each copied
              block's output goes through a zero-initialised linear layer
              and is added after the matching frozen block (MagicMotion's
              trajectory ControlNet);
  lora        a small trajectory encoder whose tokens are added to the
              generator's input tokens (zero-initialised), plus low-rank
              updates of every attention projection (B zero-initialised);
  resnet      the paper's lightweight adapter: reads only the maps (never the
              noisy clip), encoded by the generator's own frozen codec as the
              paper encodes them with its VAE, through a chain of residual 3D
              conv blocks, one per DiT block, each added to its block through
              a zero-initialised layer.

All three start as exactly the generator. An adapter reads the maps it was
trained on, box or mask (its `condition`, saved in every checkpoint of it):
`Controlled.trajectory(batch)` picks them, so every stage feeds it the same.
The adapter is trained by train_adapter.py (stage 1) and finetuned by
hybrid_finetune.py (stage 3).
"""

import copy

import torch
import torch.nn as nn
from einops import rearrange
from torch.func import functional_call

from model import config_dict, model_from_checkpoint

ADAPTERS = ("controlnet", "lora", "resnet")
CONDITIONS = {"box": "box_maps", "mask": "mask_maps"}  # condition -> the batch key of its maps
# The shipped family reads mask maps: boxes do not show an object's shape, so an
# adapter that reads them draws blobs that fill the box (docs/results.md).
DEFAULT_CONDITION = "mask"
LORA_RANK = 16  # rank of the LoRA updates


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


def trajectory_token_dim(cfg):
    """Width of one token of trajectory_channels' output, patchified like the
    generator's pixels (generator.patchify_pixels): 4 channels per patch pixel."""
    return 4 * cfg.patch_t * cfg.patch_hw ** 2


class ControlNetAdapter(nn.Module):
    def __init__(self, generator, condition, blocks=0):
        super().__init__()
        self.condition = condition
        cfg = generator.cfg
        self.n_blocks = blocks or cfg.depth // 2
        if not 1 <= self.n_blocks <= cfg.depth:
            raise ValueError(f"blocks must be between 1 and the generator's depth {cfg.depth}, got {self.n_blocks}")
        self.trajectory_embed = zero_linear(trajectory_token_dim(cfg), cfg.dim)
        # Initialised from the generator: the copy starts out knowing the video.
        self.blocks = copy.deepcopy(generator.blocks[:self.n_blocks]).requires_grad_(True)
        self.outputs = nn.ModuleList(zero_linear(cfg.dim, cfg.dim) for _ in range(self.n_blocks))

    def config(self):
        return {"type": "controlnet", "blocks": self.n_blocks}

    def forward(self, generator, x_t, t, first_frame, trajectory, keep=None, traj_keep=None, **hooks):
        tokens, c = generator.embed(x_t, t, first_frame, keep)  # (B, N, dim), (B, dim)
        h = tokens + self.trajectory_embed(generator.patchify_pixels(trajectory_channels(trajectory, traj_keep)))
        residuals = []
        for block, output in zip(self.blocks, self.outputs):
            h = block(h, c, generator.rope)
            residuals.append(output(h))
        residuals += [None] * (generator.cfg.depth - self.n_blocks)
        return generator(x_t, t, first_frame, keep, block_residuals=residuals, **hooks)


class LoRAAdapter(nn.Module):
    TARGETS = ("qkv", "proj")  # the attention projections of every block

    def __init__(self, generator, condition, rank=LORA_RANK):
        super().__init__()
        self.condition = condition
        cfg = generator.cfg
        self.rank = rank
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.encoder = nn.Sequential(nn.Linear(trajectory_token_dim(cfg), cfg.dim), nn.GELU(approximate="tanh"),
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
        tokens = self.encoder(generator.patchify_pixels(trajectory_channels(trajectory, traj_keep)))  # (B, N, dim)
        weights = dict(generator.named_parameters())
        updated = {n: weights[n] + b @ a for n, a, b in zip(self.names, self.lora_a, self.lora_b)}
        # The generator runs with its attention weights swapped for W + B A;
        # the generator module itself is never modified.
        return functional_call(generator, updated, (x_t, t, first_frame),
                               dict(keep=keep, token_residual=tokens, **hooks))


class ResNetAdapter(nn.Module):
    """Maps -> per-block residuals, whatever the noisy clip and the time: the
    same steering at every denoising step, as T2I-Adapter's features are."""

    def __init__(self, generator, condition, width=0):
        super().__init__()
        self.condition = condition
        cfg = generator.cfg
        self.width = width or cfg.dim // 2
        if self.width < 8 or self.width % 8:
            raise ValueError(f"width must be a positive multiple of 8 (GroupNorm's groups), got {self.width}")
        pt, p = generator.token_patch
        self.embed = nn.Linear((generator.space[1] + 1) * pt * p * p, self.width)  # an encoded map patch, its flag
        self.blocks = nn.ModuleList(nn.Sequential(nn.GroupNorm(8, self.width), nn.SiLU(),
                                                  nn.Conv3d(self.width, self.width, 3, padding=1))
                                    for _ in range(cfg.depth))
        self.outputs = nn.ModuleList(zero_linear(self.width, cfg.dim) for _ in range(cfg.depth))

    def config(self):
        return {"type": "resnet", "width": self.width}

    def residuals(self, generator, trajectory, traj_keep=None):
        """One (B, N, dim) residual per DiT block, from the maps (B, T, 3, H, W) in [0, 1] alone."""
        maps = generator.encode(trajectory * 2 - 1)  # (B, T, C, h, w): the frozen codec, as the clips
        h = self.embed(generator.patchify(trajectory_channels(maps, traj_keep)))  # (B, N, width)
        t, hh, ww = generator.grid
        h = rearrange(h, "b (t h w) c -> b c t h w", t=t, h=hh, w=ww)
        residuals = []
        for block, output in zip(self.blocks, self.outputs):
            h = h + block(h)
            residuals.append(output(rearrange(h, "b c t h w -> b (t h w) c")))
        return residuals

    def forward(self, generator, x_t, t, first_frame, trajectory, keep=None, traj_keep=None, **hooks):
        return generator(x_t, t, first_frame, keep, block_residuals=self.residuals(generator, trajectory, traj_keep),
                         **hooks)


def zero_linear(d_in, d_out):
    layer = nn.Linear(d_in, d_out)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def build_adapter(kind, generator, condition=DEFAULT_CONDITION, **options):
    """A fresh adapter of `kind` on `generator`, reading `condition` maps (box | mask);
    options: blocks (controlnet), rank (lora), width (resnet). A wrong argument
    raises ValueError (the script that asked turns it into its one-line error)."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}, got '{condition}'")
    kinds = {"controlnet": ControlNetAdapter, "lora": LoRAAdapter, "resnet": ResNetAdapter}
    if kind not in kinds:
        raise ValueError(f"adapter must be one of {', '.join(ADAPTERS)}, got '{kind}'")
    return kinds[kind](generator, condition, **options)


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

    @property
    def space(self):
        return self.generator.space

    def encode(self, video):
        return self.generator.encode(video)

    def decode(self, clip):
        return self.generator.decode(clip)

    def trajectory(self, batch):
        """The maps this adapter reads (box or mask), from a batch of data.collate's keys."""
        return batch[CONDITIONS[self.adapter.condition]]

    def forward(self, x_t, t, first_frame, keep=None, trajectory=None, traj_keep=None, **hooks):
        if trajectory is None:
            return self.generator(x_t, t, first_frame, keep, **hooks)
        return self.adapter(self.generator, x_t, t, first_frame, trajectory, keep, traj_keep, **hooks)


# -------------------------------------------------------------- loading ----

def adapter_from_config(config, generator, condition):
    """An adapter as a checkpoint's `adapter_config` describes it (weights not loaded)."""
    return build_adapter(config["type"], generator, condition, **{k: v for k, v in config.items() if k != "type"})


def adapter_from_checkpoint(ckpt, generator, generator_ckpt, use_ema=True, allow_other_generator=False):
    """Rebuild an adapter onto `generator` (loaded from `generator_ckpt`).
    An adapter is trained against one generator: plugging it into another
    is refused (ValueError) unless asked for (the `naive` pairing does so on purpose)."""
    if not allow_other_generator and ckpt["parent"] != generator_ckpt["run_id"]:
        raise ValueError(f"this adapter was trained on the generator checkpoint '{ckpt['parent_path']}' "
                        f"(run {ckpt['parent']}), not on run {generator_ckpt['run_id']} "
                        f"('{generator_ckpt['kind']}'); load the generator it was trained on")
    if ckpt["generator_config"] != config_dict(generator):
        raise ValueError(f"adapter made for generator config {ckpt['generator_config']}, got {config_dict(generator)}")
    adapter = adapter_from_config(ckpt["adapter_config"], generator, ckpt["condition"])
    adapter.load_state_dict(ckpt["ema" if use_ema else "model"])
    return adapter


def joint_from_checkpoint(ckpt):
    """A jointly distilled pair, the paper's baselines (dmd-joint: distill.py
    --recipe=dmd_joint; lcm: consistency.py): generator and adapter distilled
    together, saved as one Controlled state dict."""
    prefix = "generator."
    generator_weights = {k[len(prefix):]: v for k, v in ckpt["ema"].items() if k.startswith(prefix)}
    generator = model_from_checkpoint(ckpt | {"ema": generator_weights})
    model = Controlled(generator, adapter_from_config(ckpt["adapter_config"], generator, ckpt["condition"]))
    model.load_state_dict(ckpt["ema"])
    return model
