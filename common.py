"""Small pieces every training script shares: config overrides, checkpoints,
devices, DDP, EMA and the learning-rate schedule. Kept short on purpose."""

import contextlib
import json
import math
import os
import tempfile

import numpy as np
import torch
import torch.distributed as dist


class UserError(SystemExit):
    """A mistake in what the user gave us (flag, scene, path). Uncaught, Python
    prints the one-line message to stderr and exits with status 1: no traceback."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


# ---------------------------------------------------------------- config ----

def apply_overrides(config, argv):
    """nanoGPT-style `--key=value` (or `--key value`) overrides of a dict of defaults, type-checked
    against the default's type. Returns the updated dict."""
    config = dict(config)
    argv = list(argv)
    while argv:
        arg = argv.pop(0)
        if arg.startswith("--") and "=" not in arg and argv and not argv[0].startswith("--"):
            arg = f"{arg}={argv.pop(0)}"  # `--key value` reads as `--key=value`
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"expected --key=value or --key value, got '{arg}'")
        key, value = arg[2:].split("=", 1)
        if key not in config:
            known = ", ".join(sorted(config))
            raise UserError(f"unknown option --{key} (known: {known})")
        config[key] = parse_value(key, value, config[key])
    return config


def require_at_least(opt, keys, minimum=1):
    """Refuse counts below `minimum` (steps, batch sizes, intervals), naming the flag."""
    for key in keys:
        if getattr(opt, key) < minimum:
            raise UserError(f"--{key} must be at least {minimum}")


def script_settings(namespace, argv):
    """The plain-valued globals of a training script (its config block),
    overridden from the command line; the script does globals().update(...)."""
    defaults = {k: v for k, v in namespace.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}
    return apply_overrides(defaults, argv)


def parse_value(key, text, default):
    kind = type(default)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        return text
    except ValueError:
        expected = {int: "a whole number", float: "a number", bool: "true or false"}[kind]
        raise UserError(f"--{key} must be {expected}, got '{text}'") from None


# ----------------------------------------------------------- checkpoints ----

def save_checkpoint(path, payload):
    """Write atomically: a temp file in the same folder, then rename. A run killed
    mid-write leaves the previous checkpoint intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path, kind=None, map_location="cpu"):
    """Load a checkpoint dict safely (weights_only) and check what it is."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint not found: {path}")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if kind is not None and ckpt.get("kind") != kind:
        raise UserError(f"{path} holds a '{ckpt.get('kind')}' checkpoint, expected '{kind}'")
    return ckpt


def refuse_overwrite(ckpt_path, resume):
    """A finished or running run is never overwritten by accident."""
    if os.path.exists(ckpt_path) and not resume:
        raise UserError(f"{ckpt_path} exists: pass --resume=true to continue it, or choose another --out_dir")


def open_log(out_dir, step):
    """log.jsonl of a run, without the lines past `step` (a resumed run redoes them)."""
    path = os.path.join(out_dir, "log.jsonl")
    kept = [line for line in open(path)] if os.path.exists(path) else []
    log = open(path, "w")
    log.writelines(line for line in kept if json.loads(line)["step"] <= step)
    log.flush()
    return log


def noise_seed(seed, rank, index):
    """Seed of the noise, timesteps and dropout of micro-batch `index`, keyed
    like its data: resuming needs no RNG state."""
    return int(np.random.SeedSequence([seed, rank, index]).generate_state(1)[0])


TRAINING_STATE = ("model", "optimizer", "opt_generator", "opt_fake", "fake_score", "opt_adapter", "opt_disc",
                  "disc_heads")


def export_checkpoint(src, dst):
    """A run's checkpoint without what only training needs (raw weights,
    optimizers, fake score, discriminator heads): the EMA weights and the
    metadata that tie it to its parents. This is what checkpoints/ ships."""
    ckpt = load_checkpoint(src)
    save_checkpoint(dst, {key: value for key, value in ckpt.items() if key not in TRAINING_STATE})


# ------------------------------------------------------------ devices/DDP ----

def setup_distributed():
    """One script for CPU, one GPU and `torchrun` (DDP). Returns
    (rank, world_size, device). gloo on CPU so DDP is testable here, nccl on GPU."""
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world_size, device


def cleanup_distributed():
    if dist.is_initialized():
        dist.destroy_process_group()


def check_ranks_in_sync(model):
    """Every rank must hold the same weights under DDP; a silent divergence
    (a missed all-reduce) would waste a whole run, so fail loudly instead."""
    if not dist.is_initialized():
        return
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum()
    gathered = [torch.zeros_like(checksum) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, checksum)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"DDP ranks diverged: weight checksums {[g.item() for g in gathered]}")


def autocast(device):
    """bf16 autocast on CUDA; plain float32 on CPU (bf16 matmuls are slow there)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def print0(*args, **kwargs):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kwargs)


# ------------------------------------------------------- optimisation -------

def lr_at(step, base_lr, warmup, max_steps, min_ratio=0.1):
    """Linear warmup, then cosine decay to `min_ratio * base_lr`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def ema_update(ema_model, model, decay):
    for ema_p, p in zip(ema_model.parameters(), model.parameters()):
        ema_p.lerp_(p.detach(), 1 - decay)
