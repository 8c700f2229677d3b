"""The video autoencoder, pixels to a compact latent and back, as real video
DiTs use (Wan's VAE): the DiT denoises few values per token and the conv
decoder draws the edges. The slow generator (model.py, codec "latent")
holds a frozen copy and every later stage inherits it; train_autoencoder.py
(stage 0a) trains it.

Per frame, a small conv net maps (3, H, W) to (channels, H/down, W/down).
The checkpoint stores each latent channel's mean and standard deviation over
real clips; the DiT scales its latents with them to the spread of pixel
clips (model.VideoDiT.encode).
"""
import torch
import torch.nn as nn
from einops import rearrange


def conv_block(c_in, c_out, stride=1, conv=nn.Conv2d):
    """Conv, GroupNorm, SiLU: the unit of this codec and of FlashBench's feature network (fvd.py)."""
    return nn.Sequential(conv(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(8, c_out), nn.SiLU())


class FrameAutoencoder(nn.Module):
    """Clips (B, T, 3, H, W) in [-1, 1] <-> latents (B, T, channels, H/down, W/down)."""

    def __init__(self, down=2, channels=4, width=32):
        super().__init__()
        self.down, self.channels, self.width = down, channels, width
        stages = down.bit_length() - 1  # stride-2 convs
        widths = [width * 2 ** i for i in range(stages + 1)]
        self.encoder = nn.Sequential(conv_block(3, width), conv_block(width, width),
                                     *[conv_block(widths[i], widths[i + 1], stride=2) for i in range(stages)],
                                     conv_block(widths[-1], widths[-1]), nn.Conv2d(widths[-1], channels, 1))
        self.decoder = nn.Sequential(nn.Conv2d(channels, widths[-1], 1), conv_block(widths[-1], widths[-1]),
                                     *[nn.Sequential(nn.Upsample(scale_factor=2), conv_block(widths[i + 1], widths[i]))
                                       for i in reversed(range(stages))],
                                     conv_block(width, width), nn.Conv2d(width, 3, 3, padding=1))

    def config(self):
        return {"down": self.down, "channels": self.channels, "width": self.width}

    def encode(self, video):
        B = video.shape[0]
        latent = self.encoder(rearrange(video.float(), "b t c h w -> (b t) c h w"))
        return rearrange(latent, "(b t) c h w -> b t c h w", b=B)

    def decode(self, latent):
        B = latent.shape[0]
        frames = self.decoder(rearrange(latent, "b t c h w -> (b t) c h w"))
        return rearrange(frames, "(b t) c h w -> b t c h w", b=B)

    def forward(self, video, latent_noise=0.0):
        latent = self.encode(video)
        noisy = latent + latent_noise * latent.detach().std() * torch.randn_like(latent)
        return self.decode(noisy), latent
