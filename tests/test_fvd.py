import os

import pytest
import torch

import bench
import common
import data
import degrade
import fvd
import train_fvd

SHIPPED = "checkpoints/video_encoder_tiny.pt"


def test_frechet_distance_matches_the_closed_form_for_commuting_covariances():
    # With shared eigenvectors, FD = |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    rng = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=rng, dtype=torch.float64))
    a, b = torch.rand(5, generator=rng, dtype=torch.float64) + 0.1, torch.rand(5, generator=rng,
                                                                                        dtype=torch.float64)
    mu_a, mu_b = torch.randn(5, generator=rng, dtype=torch.float64), torch.randn(5, generator=rng,
                                                                                          dtype=torch.float64)
    stats_a, stats_b = (mu_a, q @ torch.diag(a) @ q.T), (mu_b, q @ torch.diag(b) @ q.T)
    expected = ((mu_a - mu_b) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum()
    assert abs(fvd.frechet_distance(stats_a, stats_b) - expected.item()) < 1e-9
    assert abs(fvd.frechet_distance(stats_b, stats_a) - expected.item()) < 1e-9
    assert abs(fvd.frechet_distance(stats_a, stats_a)) < 1e-9


def test_bootstrap_interval_draws_are_the_distances_of_the_drawn_sets():
    # The interval computes each draw from per-scene sums; it must equal drawing the features themselves.
    rng = torch.Generator().manual_seed(1)
    features = torch.randn(10, 3, 6, generator=rng, dtype=torch.float64) + torch.linspace(0, 1, 6)
    reference = fvd.Reference(torch.zeros(6, dtype=torch.float64), 2 * torch.eye(6, dtype=torch.float64))
    draws = torch.randint(10, (7, 10), generator=torch.Generator().manual_seed(0))  # what interval(seed=0) draws
    values = torch.tensor([reference.distance(features[d].flatten(0, 1)) for d in draws], dtype=torch.float64)
    excess = values.mean().item() - reference.distance(features.flatten(0, 1))
    expected = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64)) - excess
    assert torch.allclose(torch.tensor(reference.interval(features, resamples=7), dtype=torch.float64), expected)


def test_paired_interval_draws_the_same_scenes_for_both_methods():
    # Two methods on the same 40 scenes: what the scenes share (most of the spread) is in both.
    rng = torch.Generator().manual_seed(2)
    shared = 2 * torch.randn(40, 2, 5, generator=rng, dtype=torch.float64)
    a = shared + 0.1 * torch.randn(40, 2, 5, generator=rng, dtype=torch.float64)
    b = shared + 0.3 + 0.1 * torch.randn(40, 2, 5, generator=rng, dtype=torch.float64)
    reference = fvd.Reference(torch.zeros(5, dtype=torch.float64), 3 * torch.eye(5, dtype=torch.float64))
    distance = lambda f: reference.distance(f.flatten(0, 1))
    draws = torch.randint(40, (50, 40), generator=torch.Generator().manual_seed(0))  # what seed=0 draws
    values = torch.tensor([distance(a[d]) - distance(b[d]) for d in draws], dtype=torch.float64)
    values -= values.mean() - (distance(a) - distance(b))
    expected = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64))
    paired = reference.paired_interval(a, b, resamples=50)
    assert torch.allclose(torch.tensor(paired, dtype=torch.float64), expected)
    low, high = reference.interval(a, resamples=50)
    assert paired[1] - paired[0] < 0.8 * (high - low)  # the shared spread cancels (in part: FD is not linear)


def test_bootstrap_interval_of_a_distance_holds_fresh_sets_and_errs_wide():
    # Features of 60 scenes, 2 samples each, from a Gaussian at a known offset from the reference. The
    # interval of one set should hold the typical distance of fresh sets of that size, and be at least
    # as wide as their spread: drawing scenes again adds the set's own offset to the noise, so the
    # bootstrap is conservative, most near zero distance (docs/results.md).
    rng = torch.Generator().manual_seed(0)
    reference = fvd.Reference(torch.zeros(4, dtype=torch.float64), torch.eye(4, dtype=torch.float64))
    for offset in (0.0, 0.5):
        sets = [offset + torch.randn(60, 2, 4, generator=rng, dtype=torch.float64) for _ in range(30)]
        distances = torch.tensor([reference.distance(s.flatten(0, 1)) for s in sets], dtype=torch.float64)
        low, high = torch.quantile(distances, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        intervals = [reference.interval(s, resamples=200) for s in sets[:10]]
        typical = distances.median().item()
        assert sum(lo <= typical <= hi for lo, hi in intervals) >= 8, intervals
        widths = torch.tensor([hi - lo for lo, hi in intervals])
        assert 0.8 < widths.mean() / (high - low) < 3, (widths, low, high)


def test_targets_give_each_object_pixel_its_colour_shape_and_step():
    batch = train_fvd.LabelledWorld(4, 16, batch_size=6, seed=2).batch(0)
    colour_class, shape_class, flow = train_fvd.targets(batch, 16)
    palette = torch.from_numpy(data.OBJECT_COLORS).long()
    for b in range(6):
        covered = batch["masks"][b].any(0)  # (T, H, W)
        assert ((colour_class[b] > 0) == covered).all() and ((shape_class[b] > 0) == covered).all()
        assert (flow[b][~covered[:, None].expand_as(flow[b])] == 0).all() and (flow[b, 0] == 0).all()
        for k in range(int(batch["n_objects"][b])):
            slot = int((batch["colors"][b, k].long() == palette).all(-1).nonzero()[0])
            mask = batch["masks"][b, k]
            assert (colour_class[b][mask] == 1 + slot).all()
            assert (shape_class[b][mask] == 1 + batch["shapes"][b, k]).all()
            step = batch["centers"][b, k, 2] - batch["centers"][b, k, 1]
            assert torch.allclose(flow[b, 2, :, mask[2]], step[:, None].expand(2, int(mask[2].sum())))


def test_encoder_loss_drops_on_a_fixed_batch():
    torch.manual_seed(0)
    batch = train_fvd.LabelledWorld(4, 16, batch_size=8, seed=3).batch(0)
    encoder = fvd.VideoEncoder(4, 16, width=16)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=2e-3)
    first = train_fvd.encoder_loss(encoder, batch, 16)[0].item()
    for _ in range(60):
        loss = train_fvd.encoder_loss(encoder, batch, 16)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.3 * first


def test_script_trains_resumes_and_exports_the_reference_statistics(tmp_path):
    args = ["--config=micro", "--width=8", "--batch_size=4", "--ckpt_interval=2",
            "--reference_clips=16", f"--out_dir={tmp_path / 'run'}", f"--export={tmp_path / 'enc.pt'}"]
    train_fvd.main(args + ["--max_steps=4", "--stop_at=2"])  # stopped early: nothing exported yet
    assert not (tmp_path / "enc.pt").exists()
    with pytest.raises(SystemExit, match="exists"):
        train_fvd.main(args + ["--max_steps=4"])
    train_fvd.main(args + ["--max_steps=4", "--resume=true"])
    with pytest.raises(SystemExit, match="enc.pt exists: not replaced"):  # before any work
        train_fvd.main(args + ["--max_steps=4", "--resume=true"])
    exported = common.load_checkpoint(tmp_path / "enc.pt", kind="video_encoder")
    assert exported["step"] == 4 and "optimizer" not in exported
    encoder, frame_reference, clip_reference = fvd.load_encoder(tmp_path / "enc.pt")
    assert frame_reference.stats[0].shape == (48,) and clip_reference.stats[1].shape == (16, 16)
    with pytest.raises(SystemExit, match="--max_steps must be"):
        train_fvd.main(args + ["--max_steps=0"])


@pytest.mark.skipif(not os.path.exists(SHIPPED), reason="no shipped network")
def test_shipped_network_sees_every_degradation_grow_with_its_strength():
    # 48 real clips, as drawn and with each flaw at its two strengths (docs/results.md has the 96-clip
    # table). The floor is the larger score of two independent real sets.
    encoder, frame_reference, clip_reference = fvd.load_encoder(SHIPPED)
    scenes = bench.benchmark_scene_list("tiny", 8)

    def scores(kind, strength, scene_list=scenes):
        frames, clips = fvd.embed(encoder, degrade.degraded_clips(scene_list, kind, strength))
        return frame_reference.distance(frames.flatten(0, 1)), clip_reference.distance(clips)

    other = bench.benchmark_scene_list("tiny", 8, seed=bench.FLOOR_SEED)
    floor = [max(a, b) for a, b in zip(scores("blur", 0), scores("blur", 0, other))]
    for kind, (_, (weak, strong), _) in degrade.DEGRADATIONS.items():
        low, high = scores(kind, weak), scores(kind, strong)
        # FID or FVD (or both): clearly above the floor at the weak strength, and higher at the strong one
        assert any(low[m] > 1.3 * floor[m] and high[m] > max(low[m], 2 * floor[m]) for m in (0, 1)), \
            (kind, floor, low, high)
