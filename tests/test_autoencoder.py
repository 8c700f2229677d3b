import os

import pytest
import torch

import autoencoder
import bench
import common
import data
import metrics
import train_autoencoder
from test_bench import encoder_checkpoint


@pytest.mark.parametrize("down", [1, 2, 4])
def test_latents_have_the_down_sampled_shape_and_decode_back_to_frames(down):
    model = autoencoder.FrameAutoencoder(down=down, channels=3, width=8)
    video = data.SpriteWorld(4, 16, batch_size=2, seed=1).batch(0)["video"]
    latent = model.encode(video)
    assert latent.shape == (2, 4, 3, 16 // down, 16 // down)
    assert model.decode(latent).shape == video.shape


def test_reconstruction_loss_weighs_objects_and_edges():
    batch = data.SpriteWorld(4, 16, batch_size=2, seed=2).batch(0)
    video = batch["video"]
    assert train_autoencoder.reconstruction_loss(video, batch, 5.0, 1.0) == 0
    on_object = batch["masks"].any(1)[:, :, None].expand_as(video)
    shifted = video + 0.1  # the same error everywhere: objects count `object_weight` times
    share = on_object.float().mean().item()
    expected = 0.1 * (1 + 4 * share)
    loss = train_autoencoder.reconstruction_loss
    assert abs(loss(shifted, batch, 5.0, 1.0).item() - expected) < 1e-5  # no edge change
    blurred = torch.nn.functional.avg_pool2d(video.flatten(0, 1), 3, 1, 1).view_as(video)
    assert loss(blurred, batch, 1.0, 1.0) > loss(blurred, batch, 1.0, 0.0)


def test_autoencoder_loss_drops_on_a_fixed_batch():
    torch.manual_seed(0)
    batch = data.SpriteWorld(4, 16, batch_size=4, seed=3).batch(0)
    model = autoencoder.FrameAutoencoder(down=2, channels=4, width=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = train_autoencoder.reconstruction_loss(model(batch["video"])[0], batch, 5.0, 1.0).item()
    for _ in range(60):
        loss = train_autoencoder.reconstruction_loss(model(batch["video"], 0.1)[0], batch, 5.0, 1.0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.4 * first


def test_script_trains_resumes_measures_and_exports_latent_statistics(tmp_path):
    encoder_checkpoint(tmp_path / "features.pt")
    args = ["--config=micro", "--width=8", "--channels=3", "--batch_size=2", "--ckpt_interval=2", "--eval_interval=2",
            f"--features={tmp_path / 'features.pt'}", f"--out_dir={tmp_path / 'run'}", f"--export={tmp_path / 'ae.pt'}"]
    train_autoencoder.main(args + ["--max_steps=4", "--stop_at=2"])
    train_autoencoder.main(args + ["--max_steps=4", "--resume=true"])
    exported = common.load_checkpoint(tmp_path / "ae.pt", kind="autoencoder")
    assert exported["step"] == 4 and exported["latent_std"].shape == (3,) and "optimizer" not in exported
    logged = (tmp_path / "run" / "log.jsonl").read_text()
    assert '"miou"' in logged and '"fid"' in logged
    with pytest.raises(SystemExit, match="--down must be"):
        train_autoencoder.main(args[:-1] + ["--down=3", f"--out_dir={tmp_path / 'other'}"])
    with pytest.raises(SystemExit, match="python train_fvd.py"):
        train_autoencoder.main(args[:-1] + [f"--features={tmp_path / 'video_encoder_micro.pt'}",
                                            f"--out_dir={tmp_path / 'other'}"])
    with pytest.raises(SystemExit, match="ae.pt exists: not replaced"):  # refused before any work
        train_autoencoder.main(args + [f"--out_dir={tmp_path / 'other'}"])
    assert not (tmp_path / "other").exists()


SHIPPED = "checkpoints/autoencoder_tiny.pt"


@pytest.mark.skipif(not os.path.exists(SHIPPED), reason="no shipped autoencoder")
def test_shipped_autoencoder_round_trip_keeps_the_objects():
    ckpt = common.load_checkpoint(SHIPPED, kind="autoencoder")
    model = autoencoder.FrameAutoencoder(**ckpt["config"])
    model.load_state_dict(ckpt["autoencoder"])
    scenes = bench.benchmark_scenes("tiny", 16)  # the 96 real clips of docs/results.md's table
    with torch.no_grad():
        decoded = model.decode(model.encode(scenes["video"])).clamp(-1, 1)
    accuracy = metrics.mean_of(metrics.batch_trajectory_accuracy(decoded, scenes))
    assert accuracy["miou"] >= 0.95, accuracy
    assert metrics.psnr(decoded, scenes["video"]) > 30
