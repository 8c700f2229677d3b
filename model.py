"""The video DiT and flow matching: the slow generator of FlashMotion.

A clip x (B, T, C, H, W) in [-1, 1] is cut into spatio-temporal patches, run
through adaLN-Zero transformer blocks with full spatio-temporal attention and
3D rotary positions, and turned back into a velocity of the same shape.

Where the diffusion runs is the config's `codec`: "latent" (tiny, small)
denoises the clip encoded per frame by a frozen autoencoder (autoencoder.py),
as Wan does, which beat pixels in the stage-0 A/B (docs/results.md); "pixel"
(micro, for the tests) the clip itself. The token grid is the same for both.

Flow matching (rectified flow): x_t = (1 - t) x_0 + t * noise, t = 1 is pure
noise, and the network predicts the velocity v = noise - x_0. Sampling
integrates dx/dt = v from t = 1 to t = 0 with Euler steps.
"""

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange, repeat

from attention import flash_attention
from autoencoder import FrameAutoencoder


@dataclass(frozen=True)
class DiTConfig:
    frames: int = 16
    size: int = 32
    channels: int = 3
    patch_t: int = 2
    patch_hw: int = 4
    dim: int = 96
    depth: int = 6
    heads: int = 3
    mlp_ratio: float = 4.0
    codec: str = "pixel"        # pixel | latent: where the diffusion runs (module docstring)
    codec_down: int = 2         # latent: the autoencoder's spatial down-sampling
    codec_channels: int = 4     # latent: the autoencoder's latent channels
    codec_width: int = 32       # latent: the autoencoder's width (autoencoder.py)


# The clips of each config, {frames, size} (data.SpriteWorld renders them): `micro`
# is for the tests, `tiny` for a CPU and the shipped checkpoints, `small` for one GPU.
CLIP_SHAPES = {"micro": {"frames": 4, "size": 16}, "tiny": {"frames": 16, "size": 32},
               "small": {"frames": 16, "size": 64}}

# Every config by name: the model size for its clips. micro (the tests) stays
# in pixels so that the tests need no autoencoder.
CONFIGS = {
    "micro": DiTConfig(**CLIP_SHAPES["micro"], dim=32, depth=2, heads=2),
    "tiny": DiTConfig(**CLIP_SHAPES["tiny"], dim=96, depth=6, heads=3, codec="latent"),     # CPU, shipped
    "small": DiTConfig(**CLIP_SHAPES["small"], dim=384, depth=12, heads=6, codec="latent"),  # one GPU
}


CODECS = ("pixel", "latent")


# ----------------------------------------------------------------- layers ---

def modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def rope_3d(grid, head_dim, theta=100.0):
    """Factorised 3D rotary embedding: the head dim is split between time, rows
    and columns, each rotated by its own coordinate. Returns cos, sin of shape
    (N, head_dim/2). theta is small because our grids are small (8x8x8 at
    tiny): with 10000 most frequencies would barely turn over the grid."""
    d_hw = 2 * (head_dim // 6)
    dims = (head_dim - 2 * d_hw, d_hw, d_hw)
    coords = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in grid],
                                        indexing="ij"), dim=-1).reshape(-1, 3)  # (N, 3)
    angles = []
    for axis, d in enumerate(dims):
        freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        angles.append(coords[:, axis, None] * freqs[None])
    angles = torch.cat(angles, dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    """Rotate consecutive pairs of x (B, H, N, D) by the angles in cos/sin (N, D/2)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        # qk-norm keeps attention logits bounded: stable training at high lr.
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6)

    def forward(self, x, rope):
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
        q, k = apply_rope(self.q_norm(q), *rope), apply_rope(self.k_norm(k), *rope)
        out = flash_attention(q.to(v.dtype), k.to(v.dtype), v)  # (B, H, N, D)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero: the timestep embedding sets a shift,
    scale and gate for each half; gates start at zero so every block starts as
    the identity (DiT, Peebles & Xie)."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c, rope):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada_ln(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), rope)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class TimestepEmbedder(nn.Module):
    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device) / half)
        args = 1000 * t.float()[:, None] * freqs[None]  # t in [0, 1] -> DDPM-like 0..1000
        return self.mlp(torch.cat([args.cos(), args.sin()], dim=-1))


# ------------------------------------------------------------------ model ---

# Standard deviation of sprite-world videos in [-1, 1] (measured: 0.347).
SIGMA_DATA = 0.35
# The velocity is (x_t - x0) / t; t is clamped below here so that the
# flow-matching loss weights clean-estimate errors by at most 1 / T_MIN^2.
T_MIN = 0.05


def input_scale(t, sigma_data=SIGMA_DATA):
    """1 / std of x_t = (1-t) x0 + t n: the network reads unit-variance input at every t (EDM's c_in)."""
    t = t.float().view(-1, 1, 1, 1, 1)
    return ((1 - t) ** 2 * sigma_data ** 2 + t ** 2).rsqrt()


class VideoDiT(nn.Module):
    """Image-to-video DiT. The clean first frame conditions the clip by channel
    concatenation: it is repeated over time next to the noisy video, plus one
    channel saying whether it is present (0 when dropped for classifier-free
    guidance; a zero image alone would be ambiguous, since mid-grey is 0). The
    repetition gives every token its own pixels of the first frame, so the
    static background is a local copy and attention is free for the motion.
    The network predicts the clean video x0 and returns the velocity it
    implies, (x_t - x0) / t: the x-prediction of JiT (Li & He, "Back to
    Basics: Let Denoising Generative Models Denoise", 2025). Why: a token of
    96 dims cannot carry the 96 noisy pixel values of its 2x4x4 patch, so a
    velocity (noise) prediction cannot cancel the noise at low t, while a
    clean patch is flat colours, easy to predict (docs/results.md, stage 0).
    Where the first frame is given, frame 0 of the noisy video is replaced by
    it and its velocity is fixed (pin_velocity): the network only ever has to
    make frames 1..

    Hooks for the adapters and the discriminator (all optional):
      token_residual   (B, N, dim) added to the patch tokens before block 0;
      block_residuals  list of (B, N, dim) or None, one per block, added to
                       the hidden states after that block (ControlNet);
      return_features  also return the hidden states after every block.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        pt, p = cfg.patch_t, cfg.patch_hw
        if cfg.codec not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, got '{cfg.codec}'")
        down = 1 if cfg.codec == "pixel" else cfg.codec_down
        if cfg.frames % pt or cfg.size % p or p % down:
            raise ValueError(f"frames {cfg.frames} and size {cfg.size} must divide by the patch {pt}x{p}x{p}, "
                             f"and the patch by the codec's down-sampling {down}")
        self.grid = (cfg.frames // pt, cfg.size // p, cfg.size // p)
        latent = cfg.codec == "latent"
        # (T, C, H, W) of the clips the diffusion runs on, and the patch (pt, p) the tokens are cut from.
        self.space = (cfg.frames, cfg.codec_channels, cfg.size // down, cfg.size // down) if latent else \
            (cfg.frames, cfg.channels, cfg.size, cfg.size)
        self.token_patch = (pt, p // down)
        token_in, token_out = 2 * self.space[1] + 1, self.space[1]  # in: the noisy clip, the first frame, its flag
        if latent:
            self.autoencoder = FrameAutoencoder(down, cfg.codec_channels, cfg.codec_width).requires_grad_(False)
            # Per-channel statistics of real latents (attach_autoencoder sets them).
            self.register_buffer("latent_mean", torch.zeros(cfg.codec_channels))
            self.register_buffer("latent_std", torch.ones(cfg.codec_channels))
        patch_dim = pt * (p // down) ** 2
        self.patch_embed = nn.Linear(token_in * patch_dim, cfg.dim)
        self.time_embed = TimestepEmbedder(cfg.dim)
        self.blocks = nn.ModuleList(DiTBlock(cfg.dim, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_norm = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.final_ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 2 * cfg.dim))
        self.final_linear = nn.Linear(cfg.dim, token_out * patch_dim)
        cos, sin = rope_3d(self.grid, cfg.dim // cfg.heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.initialize_weights()

    def initialize_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: each block starts as the identity
            nn.init.zeros_(block.ada_ln[-1].weight)
            nn.init.zeros_(block.ada_ln[-1].bias)
        for layer in (self.final_ada_ln[-1], self.final_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def patchify(self, x, patch=None):
        """(B, T, C, H, W) -> (B, N, pt*p*p*C) tokens in (t, h, w) order;
        patch (pt, p) defaults to the token patch of self.space."""
        pt, p = patch or self.token_patch
        return rearrange(x, "b (t pt) c (h ph) (w pw) -> b (t h w) (pt ph pw c)", pt=pt, ph=p, pw=p)

    def patchify_pixels(self, x):
        """Pixel-sized maps (B, T, C, size, size) -> tokens on the same grid
        (the adapters' trajectory maps, at full resolution whatever the codec)."""
        return self.patchify(x, (self.cfg.patch_t, self.cfg.patch_hw))

    def unpatchify(self, tokens):
        """(B, N, pt*p*p*C) -> (B, T, C, H, W)."""
        t, h, w = self.grid
        pt, p = self.token_patch
        return rearrange(tokens, "b (t h w) (pt ph pw c) -> b (t pt) c (h ph) (w pw)",
                         t=t, h=h, w=w, pt=pt, ph=p, pw=p)

    @torch.no_grad()
    def encode(self, video):
        """Pixel clips (B, T, 3, size, size) in [-1, 1] -> the space the diffusion
        runs in. Latents are scaled to the pixel clips' standard deviation, so the
        noise schedule, time shift and input scaling carry over unchanged."""
        if self.cfg.codec != "latent":
            return video
        mean, std = self.latent_mean.view(-1, 1, 1), self.latent_std.view(-1, 1, 1)
        return (self.autoencoder.encode(video) - mean) / std * SIGMA_DATA

    @torch.no_grad()
    def decode(self, x):
        """The inverse of encode: clips of self.space -> pixel clips."""
        if self.cfg.codec != "latent":
            return x
        mean, std = self.latent_mean.view(-1, 1, 1), self.latent_std.view(-1, 1, 1)
        return self.autoencoder.decode(x.float() / SIGMA_DATA * std + mean)

    def condition_channels(self, x_t, first_frame, keep):
        """The noisy video with the first frame and its presence flag stacked
        on the channels: (B, T, 2C+1, H, W). keep (B,) is 1 where the first
        frame is given, 0 where it is dropped; first_frame None drops all."""
        B, T = x_t.shape[:2]
        if first_frame is None:
            first_frame, keep = torch.zeros_like(x_t[:, 0]), torch.zeros(B, device=x_t.device)
        elif keep is None:
            keep = torch.ones(B, device=x_t.device)
        keep = keep.to(x_t.dtype)[:, None, None, None]
        frame = repeat(first_frame * keep, "b c h w -> b t c h w", t=T)
        flag = repeat(keep.expand(B, 1, *x_t.shape[-2:]), "b one h w -> b t one h w", t=T)
        return torch.cat([x_t, frame, flag], dim=2)

    @staticmethod
    def frame_given(x_t, first_frame, keep):
        """(B,) bool: where the first frame is given, or None when it is dropped for all."""
        if first_frame is None:
            return None
        return torch.ones(x_t.shape[0], dtype=torch.bool, device=x_t.device) if keep is None else keep > 0.5

    @staticmethod
    def pin_first_frame(x_t, first_frame, given):
        """Frame 0 of the noisy input becomes the clean first frame where given
        (image-to-video with a clean first frame, as in Wan)."""
        frame0 = torch.where(given.view(-1, 1, 1, 1), first_frame.to(x_t.dtype), x_t[:, 0])
        return torch.cat([frame0[:, None], x_t[:, 1:]], dim=1)

    @staticmethod
    def pin_velocity(velocity, x_t, t, first_frame, given):
        """Frame 0 is known, so its velocity is set, not learned: the one whose
        clean estimate x_t - t v is exactly the first frame. Euler steps then
        land on it at t = 0, every clean estimate (DMD, the discriminator)
        carries it, and its flow-matching error is zero: the loss is spent on
        the motion."""
        exact = (x_t[:, 0] - first_frame) / t.clamp(min=1e-4).view(-1, 1, 1, 1)
        frame0 = torch.where(given.view(-1, 1, 1, 1), exact.to(velocity.dtype), velocity[:, 0])
        return torch.cat([frame0[:, None], velocity[:, 1:]], dim=1)

    @property
    def rope(self):
        return self.rope_cos, self.rope_sin

    def embed(self, x_t, t, first_frame, keep=None):
        """Input tokens (B, N, dim) and the timestep embedding (B, dim); the
        ControlNet adapter starts from the same tokens."""
        given = self.frame_given(x_t, first_frame, keep)
        x_in = x_t if given is None else self.pin_first_frame(x_t, first_frame, given)
        x_in = self.condition_channels(input_scale(t) * x_in, first_frame, keep)  # (B, T, 2C+1, H, W)
        return self.patch_embed(self.patchify(x_in)), self.time_embed(t)

    def forward(self, x_t, t, first_frame, keep=None, token_residual=None, block_residuals=None,
                return_features=False):
        """x_t (B, T, C, H, W), t (B,) in [0, 1], first_frame (B, C, H, W) or None.
        Returns the velocity (B, T, C, H, W) [and the per-block features]."""
        given = self.frame_given(x_t, first_frame, keep)
        x, c = self.embed(x_t, t, first_frame, keep)
        if token_residual is not None:
            x = x + token_residual
        features = []
        for i, block in enumerate(self.blocks):
            x = block(x, c, self.rope)
            if block_residuals is not None and block_residuals[i] is not None:
                x = x + block_residuals[i]
            if return_features:
                features.append(x)
        shift, scale = self.final_ada_ln(c).chunk(2, dim=-1)
        x0 = self.unpatchify(self.final_linear(modulate(self.final_norm(x), shift, scale)))  # (B, *self.space)
        velocity = (x_t - x0.to(x_t.dtype)) / t.clamp(min=T_MIN).view(-1, 1, 1, 1, 1).to(x_t.dtype)
        if given is not None:
            velocity = self.pin_velocity(velocity, x_t, t, first_frame, given)
        return (velocity, features) if return_features else velocity


def build_model(name_or_cfg, **overrides):
    """A fresh VideoDiT from a config name (or DiTConfig), with fields overridden (e.g. codec_width=8)."""
    cfg = CONFIGS[name_or_cfg] if isinstance(name_or_cfg, str) else name_or_cfg
    return VideoDiT(replace(cfg, **overrides))


def attach_autoencoder(model, ckpt):
    """Load a trained autoencoder checkpoint (autoencoder.py) into a latent model, frozen."""
    if ckpt["config"] != model.autoencoder.config():
        raise ValueError(f"the autoencoder is {ckpt['config']}, the model expects {model.autoencoder.config()}")
    model.autoencoder.load_state_dict(ckpt["autoencoder"])
    model.latent_mean.copy_(ckpt["latent_mean"])
    model.latent_std.copy_(ckpt["latent_std"])


def model_from_checkpoint(ckpt, use_ema=True):
    """Rebuild a VideoDiT from a checkpoint dict (train.py writes them)."""
    model = VideoDiT(DiTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["ema" if use_ema else "model"])
    return model


def config_dict(model):
    return asdict(model.cfg)


# --------------------------------------------------------- flow matching ----

# Timestep shift used in training and sampling alike: uniform u shifted by 3
# trains both ends, 14% of t above 0.95 (where every sample starts) and 12%
# below 0.3 (where the last noise goes); logit-normal t left one or the other
# almost untrained (docs/results.md, stage 0).
TIME_SHIFT = 3.0


def shift_time(t, shift):
    """Timestep shift (SD3): shift > 1 moves time towards the noisy end, where
    a few-step sampler needs its steps most."""
    return shift * t / (1 + (shift - 1) * t)


def sample_training_time(batch, rng=None, device="cpu"):
    """Training t: uniform, then shifted like the sampler's steps."""
    return shift_time(torch.rand(batch, generator=rng, device=device), TIME_SHIFT)


def add_noise(x0, noise, t):
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def clean_estimate(x_t, velocity, t):
    """x_0 implied by a velocity prediction: x_0 = x_t - t v."""
    return x_t - t.view(-1, *([1] * (x_t.dim() - 1))) * velocity


def flow_matching_loss(model, video, first_frame, rng=None, cond_drop_prob=0.0,
                       t=None, noise=None, **hooks):
    """MSE between predicted and true velocity. The first frame is dropped for
    a fraction of samples so the same network also gives the unconditional
    prediction that classifier-free guidance needs."""
    B = video.shape[0]
    if t is None:
        t = sample_training_time(B, rng, video.device)
    if noise is None:
        noise = torch.randn(video.shape, generator=rng, device=video.device)
    keep = (torch.rand(B, generator=rng, device=video.device) >= cond_drop_prob).float()
    x_t = add_noise(video, noise, t)
    velocity = model(x_t, t, first_frame, keep=keep, **hooks)
    return F.mse_loss(velocity.float(), (noise - video).float())


def sampling_times(steps, device="cpu"):
    """steps + 1 times from 1 (noise) to 0 (data), shifted."""
    return shift_time(torch.linspace(1, 0, steps + 1, device=device), TIME_SHIFT)


def guided_velocity(model, guidance, cond, uncond):
    """Velocity function with classifier-free guidance, in the `uncond + w
    (cond - uncond)` convention: w = 1 is no guidance (and costs one network
    call instead of two). cond holds the model's keyword arguments; uncond
    the ones that differ for the unconditional branch (e.g. first_frame=None)."""
    def velocity(x, t):
        v_cond = model(x, t, **cond)
        if guidance == 1.0:
            return v_cond
        v_uncond = model(x, t, **{**cond, **uncond})
        return v_uncond + guidance * (v_cond - v_uncond)
    return velocity


@torch.no_grad()
def euler_sample(velocity_fn, noise, times):
    """Integrate from times[0] (noise) to times[-1] with Euler steps."""
    x = noise
    for t, t_next in zip(times[:-1], times[1:]):
        x = x + (t_next - t) * velocity_fn(x, t.expand(x.shape[0]))
    return x


@torch.no_grad()
def generate(model, first_frame, steps=50, guidance=1.0, rng=None, uncond=None, **conditions):
    """A clip from a pixel first frame (B, C, H, W): pixels (B, T, C, H, W) in
    [-1, 1], sampled in the model's space (encode, sample, decode). model is
    the generator or anything called like it (adapter.Controlled); conditions
    are its extra keyword arguments; guidance drops the first frame unless
    uncond says what else to drop."""
    times = sampling_times(steps, first_frame.device)
    cond = dict(first_frame=encode_first_frame(model, first_frame), **conditions)
    velocity = guided_velocity(model, guidance, cond, {"first_frame": None} if uncond is None else uncond)
    return model.decode(euler_sample(velocity, initial_noise(model, first_frame, rng), times)).clamp(-1, 1)


def encode_first_frame(model, frame):
    """A pixel first frame (B, C, size, size) in the space the model (or a Controlled) runs in."""
    return model.encode(frame[:, None])[:, 0]


def initial_noise(model, first_frame, rng):
    """Pure noise (B, *model.space), where every sampler starts."""
    return torch.randn((first_frame.shape[0], *model.space), generator=rng, device=first_frame.device)


# ------------------------------------------------------ few-step sampler ----

# The fast generator's 4 times, before the timestep shift it was distilled with
# (distill.py --fast_shift, saved in its checkpoint as `time_shift`): t = 1, 0.75,
# 0.5, 0.25 become 1, 0.9, 0.75, 0.5 with shift 3 (most of the work is at high noise).
FAST_TIMES = (1.0, 0.75, 0.5, 0.25)


def fast_times(shift, device="cpu"):
    return shift_time(torch.tensor(FAST_TIMES, device=device), shift)


def few_step_step(model, x, t, conditions):
    """One step of the few-step sampler: the clean clip the model predicts at time t."""
    t = t.expand(x.shape[0])
    return clean_estimate(x, model(x, t, **conditions), t)


def pick_step(seed, iteration, steps):
    """Which step k of the few-step list a training iteration trains (backward
    simulation), keyed on the iteration alone, so that all ranks agree."""
    return int(torch.randint(steps, (1,), generator=torch.Generator().manual_seed(seed * 7919 + iteration)))


def few_step_sample(model, noise, times, conditions, rng=None, stop_after=None):
    """The fast generator's sampler (DMD2): at each time predict the clean
    clip, then re-noise it to the next time with fresh noise. stop_after=k
    returns after k steps the noisy clip at times[k], the input of step k
    (backward simulation: training inputs come from the generator itself)."""
    x = noise
    for k, t in enumerate(times):
        if k == stop_after:
            return x
        x0 = few_step_step(model, x, t, conditions)
        if k + 1 < len(times):
            fresh = torch.randn(x.shape, generator=rng, device=x.device)
            x = add_noise(x0, fresh, times[k + 1].expand(x.shape[0]))
    return x0


@torch.no_grad()
def fast_generate(model, first_frame, shift, rng=None, **conditions):
    """A clip in len(FAST_TIMES) steps, shifted by `shift` (the fast generator's
    checkpoint's), from a pixel first frame: pixels (B, T, C, H, W) in [-1, 1]."""
    times = fast_times(shift, first_frame.device)
    clip = few_step_sample(model, initial_noise(model, first_frame, rng), times,
                           dict(first_frame=encode_first_frame(model, first_frame), **conditions), rng)
    return model.decode(clip).clamp(-1, 1)
