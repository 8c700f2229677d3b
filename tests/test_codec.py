"""Where the diffusion runs (model.py's codec): pixels, or a frozen autoencoder's latent."""

import pytest
import torch

import data
from adapter import Controlled, build_adapter
from autoencoder import FrameAutoencoder
from model import CODECS, attach_autoencoder, build_model, flow_matching_loss, generate
from test_model import losses_on_a_fixed_batch, random_final_layer


def autoencoder_checkpoint(channels=4, width=8, seed=0):
    """What autoencoder.py saves: a (here untrained) autoencoder and its latents' statistics."""
    torch.manual_seed(seed)
    autoencoder = FrameAutoencoder(down=2, channels=channels, width=width)
    return {"kind": "autoencoder", "config": autoencoder.config(), "autoencoder": autoencoder.state_dict(),
            "latent_mean": torch.randn(channels), "latent_std": torch.rand(channels) + 0.5}


def micro_model(codec, seed=0):
    torch.manual_seed(seed)
    model = build_model("micro", codec=codec, codec_width=8)
    if codec == "latent":
        attach_autoencoder(model, autoencoder_checkpoint())
    return random_final_layer(model)


@pytest.mark.parametrize("codec", CODECS)
def test_each_codec_has_the_same_token_grid_and_samples_pixels(codec):
    model = micro_model(codec)
    video = data.SpriteWorld(4, 16, batch_size=2, seed=0).batch(0)["video"]  # (2, 4, 3, 16, 16)
    x = model.encode(video)
    assert x.shape == (2, *model.space) and model.grid == build_model("micro").grid
    assert model.space == ((4, 4, 8, 8) if codec == "latent" else (4, 3, 16, 16))
    velocity, features = model(x, torch.tensor([0.3, 0.8]), x[:, 0], return_features=True)
    assert velocity.shape == x.shape and features[0].shape == (2, 32, 32)
    clip = generate(model, video[:, 0], steps=2, rng=torch.Generator().manual_seed(0))
    assert clip.shape == video.shape
    # Frame 0 is the given first frame (through the autoencoder where there is one).
    torch.testing.assert_close(clip[:, 0], model.decode(model.encode(video[:, :1]))[:, 0].clamp(-1, 1))


def test_latent_codec_is_the_frozen_autoencoder_scaled_to_the_pixels_spread():
    ckpt = autoencoder_checkpoint()
    model = micro_model("latent")
    autoencoder = FrameAutoencoder(down=2, channels=4, width=8)
    autoencoder.load_state_dict(ckpt["autoencoder"])
    video = data.SpriteWorld(4, 16, batch_size=2, seed=1).batch(0)["video"]
    mean, std = ckpt["latent_mean"].view(-1, 1, 1), ckpt["latent_std"].view(-1, 1, 1)
    latent = model.encode(video)
    torch.testing.assert_close(latent, (autoencoder.encode(video) - mean) / std * 0.35)
    torch.testing.assert_close(model.decode(latent), autoencoder.decode(autoencoder.encode(video)))
    # Training the DiT leaves the autoencoder alone.
    flow_matching_loss(model, latent, latent[:, 0], torch.Generator().manual_seed(0)).backward()
    assert all(p.grad is None for p in model.autoencoder.parameters())
    assert any(p.grad is not None for p in model.blocks.parameters())
    with pytest.raises(ValueError, match="the model expects"):
        attach_autoencoder(model, autoencoder_checkpoint(channels=3))


def test_flow_matching_loss_halves_on_a_fixed_batch_in_the_latent():
    model = micro_model("latent")
    video = model.encode(data.SpriteWorld(4, 16, batch_size=4, seed=2).batch(0)["video"])
    losses = losses_on_a_fixed_batch(model, video, 100)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("kind", ["controlnet", "resnet"])
@pytest.mark.parametrize("codec", CODECS)
def test_adapter_reads_full_resolution_maps_on_any_codec(codec, kind):
    """The ControlNet patchifies the pixel maps; the ResNet adapter reads them through the codec."""
    generator = micro_model(codec).requires_grad_(False)
    controlled = Controlled(generator, build_adapter(kind, generator))
    batch = data.SpriteWorld(4, 16, batch_size=2, seed=3).batch(0)
    x, t = generator.encode(batch["video"]), torch.tensor([0.4, 0.7])
    base = generator(x, t, x[:, 0])
    torch.testing.assert_close(controlled(x, t, x[:, 0], trajectory=batch["box_maps"]), base)  # zero-initialised
    if kind == "controlnet":
        torch.nn.init.normal_(controlled.adapter.trajectory_embed.weight, std=0.1)
    for layer in controlled.adapter.outputs:
        torch.nn.init.normal_(layer.weight, std=0.1)
    moved = controlled(x, t, x[:, 0], trajectory=batch["box_maps"])
    other = controlled(x, t, x[:, 0], trajectory=batch["box_maps"].roll(4, dims=-1))
    assert not torch.allclose(moved, base) and not torch.allclose(moved, other)
