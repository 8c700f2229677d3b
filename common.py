"""The small habits every script shares: flags, checkpoints, the run helper
(resume, atomic save, log, progress bar), DDP, EMA and the lr schedule."""

import contextlib
import json
import math
import os
import tempfile
import time
import uuid
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from plot import write_curves


class UserError(SystemExit):
    """A mistake in what the user gave us (flag, scene, path). Uncaught, Python
    prints the one-line message to stderr and exits with status 1: no traceback."""

    def __init__(self, message):
        super().__init__(f"error: {message}")


# ----------------------------------------------------------------- flags ----

BOOLEANS = ("true", "false", "1", "0")


def parse_flags(flags, argv, doc, recipes=None):
    """A script's flags, {name: (default, one line of help)}, overridden by
    `--key=value` or `--key value` and type-checked against the default; a
    boolean flag alone (`--resume`) means true. A default that is a type
    (`int`) makes the flag optional: None unless given. recipes, {name:
    {flag: value}}, are named flag sets: `--config=<name>` switches to that
    config's (the small recipe), `--recipe=<name>` to any of them on top (the
    course's 10-minute lab); a flag given on the command line wins. `--help`
    prints the script's docstring and its flags, then exits."""
    if "--help" in argv or "-h" in argv:
        print(usage(flags, doc, recipes or {}))
        raise SystemExit(0)
    values = {name: None if isinstance(default, type) else default for name, (default, _) in flags.items()}
    given = set()
    argv = list(argv)
    while argv:
        arg = argv.pop(0)
        bare = arg.startswith("--") and "=" not in arg
        if bare and isinstance(flags.get(arg[2:], (None,))[0], bool):
            value = argv.pop(0) if argv and argv[0].lower() in BOOLEANS else "true"
            arg = f"{arg}={value}"  # a bare boolean flag means true
        elif bare and argv and not argv[0].startswith("--"):
            arg = f"{arg}={argv.pop(0)}"  # `--key value` reads as `--key=value`
        if not arg.startswith("--") or "=" not in arg:
            raise UserError(f"expected --key=value or --key value, got '{arg}' (--help lists the flags)")
        key, text = arg[2:].split("=", 1)
        if key not in flags:
            raise UserError(f"unknown option --{key} (known: {', '.join(sorted(flags)) or 'none'})")
        default = flags[key][0]
        values[key] = parse_value(key, text, default if isinstance(default, type) else type(default))
        given.add(key)
    recipes = recipes or {}
    if values.get("recipe") and values["recipe"] not in recipes:
        raise UserError(f"--recipe must be one of {', '.join(recipes) or 'none'}, got '{values['recipe']}'")
    for name in (values.get("config"), values.get("recipe")):
        for key, value in recipes.get(name, {}).items():
            if key not in given:
                values[key] = value
    return SimpleNamespace(**values)


def parse_value(key, text, kind):
    try:
        if kind is bool:
            if text.lower() not in BOOLEANS:
                raise ValueError
            return text.lower() in ("true", "1")
        if kind is int:
            value = int(text)
            if key == "seed" and not 0 <= value < 2 ** 32:  # torch and numpy seeds, with room for offsets
                raise UserError(f"--seed must be a whole number from 0 to {2 ** 32 - 1}, got '{text}'")
            if value < 0:  # every count, step and size of this project is >= 0
                raise UserError(f"--{key} must not be negative, got '{text}'")
            return value
        if kind is float:
            value = float(text)
            if not math.isfinite(value) or value < 0:  # rates, weights, probabilities, guidance: all >= 0
                raise UserError(f"--{key} must be a finite number, not negative, got '{text}'")
            return value
        return text
    except ValueError:
        expected = {int: "a whole number", float: "a number", bool: "true or false"}[kind]
        raise UserError(f"--{key} must be {expected}, got '{text}'") from None


def usage(flags, doc, recipes):
    lines = [doc.strip(), "", "flags (--key=value or --key value):" if flags else "no flags"]
    for name, (default, help_line) in flags.items():
        shown = "(not set)" if isinstance(default, type) else default
        other = "".join(f" ({config}: {recipe[name]})" for config, recipe in recipes.items() if name in recipe)
        lines.append(f"  --{name}={shown}".ljust(34) + f" {help_line}{other}")
    return "\n".join(lines)


@contextlib.contextmanager
def as_user_error(flag=""):
    """A network's ValueError (a wrong argument, checkpoints that do not pair)
    becomes the script's one-line UserError, naming the flag to blame if any."""
    try:
        yield
    except ValueError as e:
        raise UserError(f"{flag}: {e}" if flag else str(e)) from None


def require_at_least(opt, keys, minimum=1):
    """Refuse counts below `minimum` (steps, batch sizes, intervals), naming the flag."""
    for key in keys:
        value = getattr(opt, key)
        if value is not None and value < minimum:
            raise UserError(f"--{key} must be at least {minimum}, got {value}")


def require_one_of(opt, key, choices):
    if getattr(opt, key) not in choices:
        raise UserError(f"--{key} must be one of {', '.join(choices)}, got '{getattr(opt, key)}'")


def require_indices(opt, key, limit=None):
    """A flag of comma-separated indices in 0..limit-1 (blocks, steps; any whole numbers without a limit), as a list."""
    text = getattr(opt, key)
    items = [int(i) for i in text.split(",") if i.isdigit()]
    if len(items) != len(text.split(",")) or limit is not None and any(i >= limit for i in items):
        allowed = "whole numbers" if limit is None else f"numbers in 0..{limit - 1}"
        raise UserError(f"--{key} must be comma-separated {allowed}, got '{text}'")
    return items


def check_writable(path):
    """Refuse, before any work, an output file that cannot be written, naming
    it; nothing is created. The nearest existing folder on its way must take a
    file: a real probe, not os.access (root may 'access' /proc and still not
    write there)."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder: give a file name")
    existing = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(existing):
        if os.path.exists(existing):
            raise UserError(f"{path}: {existing} is a file, not a folder")
        existing = os.path.dirname(existing)
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as e:
        raise UserError(f"{path}: cannot write in {existing} ({e.strerror})") from None


def check_new_file(path):
    """Refuse, before any work, an output that would replace an existing file
    (what checkpoints/ ships is never overwritten) or that cannot be written."""
    if os.path.exists(path):
        raise UserError(f"{path} exists: not replaced (remove it first to export anew)")
    check_writable(path)


# ----------------------------------------------------------- checkpoints ----

# The command that makes each shipped checkpoint (by file-name prefix), for error messages.
MADE_BY = {"slow_generator": "python train.py", "slow_adapter": "python train_adapter.py",
           "fast_generator": "python distill.py",
           "dmd_joint": "python distill.py --recipe=dmd_joint", "lcm_joint": "python consistency.py",
           "fast_adapter": "python hybrid_finetune.py", "video_encoder": "python train_fvd.py",
           "autoencoder": "python train_autoencoder.py"}


# The kinds of checkpoint that hold a whole jointly distilled pair (adapter.joint_from_checkpoint).
JOINT_KINDS = ("dmd_joint", "lcm_joint")


def how_to_make(path):
    name = os.path.basename(str(path))
    for prefix, command in MADE_BY.items():
        if name.startswith(prefix):
            pipeline = ", or bash pipeline.sh"
            if prefix in JOINT_KINDS:  # a pair distilled from its family's slow adapter
                rest = name[len(prefix):]  # "_lora_mask_tiny.pt", "_mask_tiny.pt" (the ControlNet's), "_tiny.pt"
                family = rest.startswith(("_lora_", "_resnet_"))
                adapter = "slow_adapter" + (rest if family else "_controlnet" + rest)
                command += f" --adapter_ckpt={os.path.join(os.path.dirname(str(path)), adapter)}"
                pipeline = "" if family else pipeline  # pipeline.sh distils the ControlNet's pairs only
            maps = ", on box maps (pipeline.sh)" if "_mask_" not in name and "adapter" in name else ""
            return f"make it with {command}{maps} (then export its ckpt.pt there){pipeline}"
    return "it is written by the script that trained it (README: each stage's command)"


def save_checkpoint(path, payload):
    """Write atomically: a temp file in the same folder, then rename. A run killed
    mid-write leaves the previous checkpoint intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is private (0600); a checkpoint is not
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
    if not os.path.isfile(path):
        raise UserError(f"checkpoint not found: {path}; {how_to_make(path)}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = ("it holds more than tensors and plain values, which weights_only=True refuses to run"
                  if "Weights only load failed" in str(e) else "truncated, or not written by torch.save")
        raise UserError(f"{path} is not a readable checkpoint ({reason}); {how_to_make(path)}") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is not a checkpoint of this project; {how_to_make(path)}")
    if kind is not None and ckpt.get("kind") != kind:
        raise UserError(f"{path} holds a '{ckpt.get('kind')}' checkpoint, expected '{kind}'")
    return ckpt


TRAINING_STATE = ("model", "optimizer", "optimizer_generator", "optimizer_fake", "fake_score", "optimizer_adapter",
                  "optimizer_discriminator", "discriminator")


def export_checkpoint(src, dst):
    """A run's checkpoint without what only training needs (raw weights,
    optimizers, fake score, discriminator classifier): the EMA weights and the
    metadata that tie it to its parents. This is what checkpoints/ ships, so
    an existing file is never replaced: remove it first to export anew.
    Network weights are stored in fp16, half the bytes: load_state_dict casts
    them back into the fp32 model, and the rounding (relative 5e-4) moves a
    sampled pixel by 1e-4 on average. Loose tensors (a latent's statistics)
    stay as they are."""
    check_new_file(dst)
    ckpt = load_checkpoint(src)
    save_checkpoint(dst, {key: half_state_dict(value) if isinstance(value, dict) else value
                          for key, value in ckpt.items() if key not in TRAINING_STATE})


def half_state_dict(state):
    return {name: tensor.half() if torch.is_tensor(tensor) and tensor.dtype == torch.float32 else tensor
            for name, tensor in state.items()}


# ------------------------------------------------------------------- run ----

class Run:
    """The plumbing of one training run in `opt.out_dir`, the same for every
    stage: refuse to overwrite, resume from `ckpt.pt`, DDP set-up, the data
    loader, an atomic checkpoint, `log.jsonl` and the progress bar.

        run = Run(opt, kind="slow_generator")       # run.saved: the checkpoint to resume, or None
        run.restore(model=raw_model, ema=ema_model)  # its state, by checkpoint key
        for step in run.steps("stage 0"):            # step: 0-based index of the step being trained,
            ...                                      # the loop's one counter (Run counts steps done)
            run.log({"loss": ...}, clips=batch_size)
            if run.due(opt.ckpt_interval):
                run.save(raw_model, ema=...)
                run.draw_curves()

    The data and noise of step s are pure functions of (seed, rank, s), so
    resuming needs no RNG state and replays exactly what an uninterrupted run sees."""

    def __init__(self, opt, kind):
        self.opt, self.kind = opt, kind
        self.path = os.path.join(opt.out_dir, "ckpt.pt")
        if os.path.exists(self.path) and not opt.resume:
            raise UserError(f"{self.path} exists: pass --resume=true to continue it, or choose another --out_dir")
        check_writable(self.path)
        if opt.threads:  # a laptop class: one thread each, whatever else the machine runs (docs/course.md)
            torch.set_num_threads(opt.threads)
        self.rank, self.world_size, self.device = setup_distributed()
        self.master = self.rank == 0
        torch.manual_seed(opt.seed)  # identical initial weights on every rank
        self.step, self.run_id, self.saved = 0, uuid.uuid4().hex[:12], None
        if os.path.exists(self.path):
            self.saved = load_checkpoint(self.path, kind=kind, map_location=self.device)
            self.step, self.run_id = self.saved["step"], self.saved["run_id"]
        elif opt.resume and self.master:
            print(f"no checkpoint at {self.path}: starting from scratch")
        self.end = min(opt.stop_at or opt.max_steps, opt.max_steps)

    def restore(self, **parts):
        """Load each part (a module or an optimizer) from the checkpoint key of its name."""
        if self.saved is not None:
            for key, part in parts.items():
                part.load_state_dict(self.saved[key])
            self.saved = None  # free the memory

    def wrap(self, module):
        """torch.compile after loading and before the DDP wrap (nanoGPT's order)."""
        module = torch.compile(module) if self.opt.compile else module
        if self.world_size > 1:
            module = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return module

    def batches(self, stream):
        """An endless iterator over a data.BatchStream, rendered by `num_workers` processes."""
        workers = self.opt.num_workers
        return iter(DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=workers > 0))

    def steps(self, desc, measure_start=None):
        """Yield the 0-based index of each step to train. measure_start, a function
        returning a record, is logged as step 0 before a fresh run's first step (rank 0)."""
        os.makedirs(self.opt.out_dir, exist_ok=True)
        self.log_file = open_log(self.opt.out_dir, self.step) if self.master else None
        if self.master and self.step == 0 and measure_start is not None:
            self.log_file.write(json.dumps({"step": 0, **measure_start()}) + "\n")
        self.bar = tqdm(total=self.end, initial=self.step, disable=not self.master, desc=desc, dynamic_ncols=True)
        self.last_time = time.time()
        limit = getattr(self.opt, "time_limit", 0)
        deadline = self.last_time + 60 * limit
        while self.step < self.end:
            if limit and self.out_of_time(deadline):
                self.end = self.step + 1  # this step is the last: due() checkpoints it
            self.step += 1
            yield self.step - 1
        self.bar.close()
        if self.master:
            print(f"{'done' if self.step == self.opt.max_steps else 'stopped'}: {self.path} "
                  f"at step {self.step}/{self.opt.max_steps}")
        cleanup_distributed()

    def out_of_time(self, deadline):
        """Past the --time_limit deadline, as rank 0's clock says (all ranks stop together)."""
        if self.world_size == 1:
            return time.time() > deadline
        flag = torch.tensor([float(time.time() > deadline)], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())

    def due(self, interval, at=()):
        """True every `interval` steps and at the last step of this session; also after the steps `at`."""
        return interval > 0 and (self.step % interval == 0 or self.step == self.end) or self.step in at

    def save(self, trained, /, **payload):
        """All ranks check that the `trained` module's weights agree; rank 0 writes the checkpoint."""
        check_ranks_in_sync(trained)
        if self.master:
            save_checkpoint(self.path, {"kind": self.kind, "run_id": self.run_id, "step": self.step,
                                        "train_config": vars(self.opt), **payload})

    def log(self, record, clips):
        """One line of log.jsonl and the progress bar, with the throughput of the step done."""
        now = time.time()
        record = {"step": self.step, **record, "samples_per_s": round(clips * self.world_size /
                                                                      (now - self.last_time), 2),
                  "time": round(now, 1)}
        self.last_time = now
        self.bar.update(1)
        self.bar.set_postfix({k: v for k, v in record.items() if isinstance(v, float) and k != "time"})
        if self.master:
            self.log_file.write(json.dumps(record) + "\n")
            self.log_file.flush()

    def draw_curves(self):
        """log.jsonl as a picture, curves.png beside it (rank 0; plot.py)."""
        if self.master:
            write_curves(self.log_file.name, os.path.join(self.opt.out_dir, "curves.png"))

    def write(self, message):
        """A line of text above the progress bar, after the count of steps done (rank 0)."""
        if self.master:
            self.bar.write(f"step {self.step}: {message}")

    def sample_path(self):
        """Where the samples of the step just done go: <out_dir>/samples/step_<steps done>.gif."""
        return os.path.join(self.opt.out_dir, "samples", f"step_{self.step:06d}.gif")


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
    """Every rank reaches the barrier before any tears the group down: a rank
    that leaves while rank 0 still writes the checkpoint can abort gloo."""
    if dist.is_initialized():
        dist.barrier()
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


def set_threads(threads):
    """Sample on `threads` CPU threads; 0: half the cores this process may run
    on, at least one. PyTorch's default, every core, makes a 4-step clip 50
    times slower as soon as another program keeps one core busy (its threads
    wait for the one that shares that core; docs/results.md). Returns the count."""
    if threads == 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        threads = max(1, cores // 2)
    torch.set_num_threads(threads)
    return threads


def pick_device(name):
    """--device=cpu|cuda, refused when CUDA is asked for and there is none."""
    if name not in ("cpu", "cuda") or (name == "cuda" and not torch.cuda.is_available()):
        raise UserError(f"--device must be cpu or cuda (with a GPU), got '{name}'")
    return torch.device(name)


# ------------------------------------------------------- optimisation -------

def lr_at(step, base_lr, warmup, max_steps, min_ratio=0.1):
    """Linear warmup, then cosine decay to `min_ratio * base_lr`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def clipped_step(optimizer, module, grad_clip):
    """Clip the module's gradient norm, step, zero the gradient: the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), grad_clip).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@torch.no_grad()
def ema_update(ema_model, model, decay):
    for ema_p, p in zip(ema_model.parameters(), model.parameters()):
        ema_p.lerp_(p.detach(), 1 - decay)


def ema_decay_at(step, decay):
    """The EMA warms up: short runs average over their few steps, not over the initial weights."""
    return min(decay, (1 + step) / (10 + step))
