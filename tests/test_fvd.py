import os

import pytest
import torch

import common
import data
import fvd

SHIPPED = "checkpoints/video_encoder_tiny.pt"


def test_frechet_distance_matches_the_closed_form_for_commuting_covariances():
    # With shared eigenvectors, FD = |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    generator = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=generator, dtype=torch.float64))
    a, b = torch.rand(5, generator=generator, dtype=torch.float64) + 0.1, torch.rand(5, generator=generator,
                                                                                        dtype=torch.float64)
    mu_a, mu_b = torch.randn(5, generator=generator, dtype=torch.float64), torch.randn(5, generator=generator,
                                                                                          dtype=torch.float64)
    stats_a, stats_b = (mu_a, q @ torch.diag(a) @ q.T), (mu_b, q @ torch.diag(b) @ q.T)
    expected = ((mu_a - mu_b) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    assert abs(fvd.frechet_distance(stats_a, stats_b) - expected.item()) < 1e-9
    assert abs(fvd.frechet_distance(stats_b, stats_a) - expected.item()) < 1e-9
    assert abs(fvd.frechet_distance(stats_a, stats_a)) < 1e-9


def test_targets_name_each_object_by_its_colour():
    batch = data.SpriteWorld(4, 16, batch_size=6, seed=2).batch(0)
    present, centres = fvd.targets(batch, 16)
    assert present.sum(1).tolist() == batch["n_objects"].tolist()
    assert ((centres >= 0) & (centres <= 1)).all()
    assert (centres[present == 0] == 0).all()


def test_encoder_loss_drops_on_a_fixed_batch():
    torch.manual_seed(0)
    batch = data.SpriteWorld(4, 16, batch_size=8, seed=3).batch(0)
    encoder = fvd.VideoEncoder(4, 16, width=16, feature_dim=32)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=2e-3)
    first = fvd.encoder_loss(encoder, batch)[0].item()
    for _ in range(60):
        loss = fvd.encoder_loss(encoder, batch)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.3 * first


def test_script_trains_resumes_and_exports_the_reference_statistics(tmp_path):
    args = ["--config=micro", "--width=8", "--feature_dim=8", "--batch_size=4", "--ckpt_interval=2",
            "--reference_clips=16", f"--out_dir={tmp_path / 'run'}", f"--export={tmp_path / 'enc.pt'}"]
    fvd.main(args + ["--max_steps=2"])
    with pytest.raises(SystemExit, match="exists"):
        fvd.main(args + ["--max_steps=4"])
    fvd.main(args + ["--max_steps=4", "--resume=true"])
    exported = common.load_checkpoint(tmp_path / "enc.pt", kind="video_encoder")
    assert exported["step"] == 4 and "optimizer" not in exported
    encoder, (mean, cov) = fvd.load_encoder(tmp_path / "enc.pt")
    assert mean.shape == (8,) and cov.shape == (8, 8)
    with pytest.raises(SystemExit, match="--max_steps must be"):
        fvd.main(args + ["--max_steps=0"])


@pytest.mark.skipif(not os.path.exists(SHIPPED), reason="no shipped encoder")
def test_shipped_encoder_ranks_real_clips_before_corrupted_ones():
    encoder, reference = fvd.load_encoder(SHIPPED)
    real = data.SpriteWorld(16, 32, batch_size=128, seed=data.HELD_OUT_SEED).batch(0)["video"]
    generator = torch.Generator().manual_seed(0)
    noisy = lambda s: (real + s * torch.randn(real.shape, generator=generator)).clamp(-1, 1)
    blurred = torch.nn.functional.avg_pool2d(real.flatten(0, 1), 3, 1, 1).view_as(real)
    frozen = real[:, :1].expand_as(real)  # a static video
    scores = {name: fvd.fvd(encoder, reference, clips) for name, clips in
              (("real", real), ("noise 0.1", noisy(0.1)), ("noise 0.3", noisy(0.3)), ("blur", blurred),
               ("static", frozen))}
    assert scores["real"] < scores["noise 0.1"] < scores["noise 0.3"], scores
    assert scores["real"] < scores["blur"] and scores["real"] < scores["static"], scores
