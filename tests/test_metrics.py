import copy

import numpy as np
import pytest
import torch

import data
import degrade
import metrics


def scenes(n=8):
    return data.SpriteWorld(16, 32, batch_size=n, seed=7).batch(0)


def test_real_clips_are_segmented_perfectly():
    batch = scenes()
    for result in metrics.batch_trajectory_accuracy(batch["video"], batch):
        assert result["miou"] == 1.0 and result["center_err_px"] == 0.0
        assert result["box_iou"] > 0.7  # visible pixels vs amodal boxes: occlusion lowers it


def test_a_static_clip_scores_far_below_the_real_one():
    batch = scenes()
    static = batch["video"][:, :1].expand_as(batch["video"])
    result = metrics.mean_of(metrics.batch_trajectory_accuracy(static, batch))
    assert result["miou"] < 0.5 and result["center_err_px"] > 2


def test_shifted_objects_give_the_shift_as_centre_error():
    # One square moved 3 px right of its target in every frame.
    T, S = 4, 32
    video = -torch.ones(T, 3, S, S)
    masks = torch.zeros(6, T, S, S, dtype=torch.bool)
    masks[0, :, 10:16, 8:14] = True
    shifted = torch.roll(masks[0], 3, dims=-1)
    video[:, 0][shifted] = 1.0  # red: (255, 0, 0)
    video[:, 1][shifted] = -1.0
    video[:, 2][shifted] = -1.0
    colors = torch.zeros(6, 3, dtype=torch.uint8)
    colors[0] = torch.tensor([255, 0, 0])
    boxes = torch.zeros(6, T, 4)
    boxes[0] = torch.tensor([8.0, 10.0, 14.0, 16.0])
    truth = -torch.ones(T, 3, S, S)  # a black background
    result = metrics.trajectory_accuracy(video, truth, masks, boxes, colors, 1)
    assert abs(result["center_err_px"] - 3.0) < 1e-5
    assert abs(result["miou"] - 18 / 54) < 1e-5  # 6x3 overlap over 6x9 union
    assert abs(result["box_iou"] - 18 / 54) < 1e-5


def test_the_background_is_recovered_from_the_true_clip_even_where_an_object_never_moves():
    world = data.SpriteWorld(16, 32, batch_size=4, seed=8)
    scenes_ = world.scenes(0)
    scenes_[0].objects[0].centers[:] = scenes_[0].objects[0].centers[0]  # parked for the whole clip
    batch = data.collate([data.to_sample(data.render(s), 32) for s in scenes_])
    for i, scene in enumerate(scenes_):
        expected = torch.from_numpy(data.render_background(scene.background, 32)).float().permute(2, 0, 1) * 2 - 1
        found = metrics.background_of(batch["video"][i], batch["masks"][i])
        parked = batch["masks"][i].any(0).all(0)  # covered in every frame: filled from its neighbours
        assert torch.allclose(found[:, ~parked], expected[:, ~parked], atol=1e-6)
        if parked.any():  # quiet backgrounds: the neighbours' colour is close
            assert (found[:, parked] - expected[:, parked]).abs().max() < 0.15
    assert batch["masks"][0].any(0).all(0).any()  # the parked object did hide some pixels throughout


def accuracy(clips, batch):
    return metrics.mean_of(metrics.batch_trajectory_accuracy(clips, batch))


def test_objects_are_found_where_they_are_when_their_colours_drift():
    world = data.SpriteWorld(16, 32, batch_size=12, seed=9)
    scene_list, batch = world.scenes(0), world.batch(0)
    faded = degrade.degraded_clips(scene_list, "fade", 0.4)  # 40% of the way to the background
    assert accuracy(faded, batch)["miou"] > 0.99
    # 40% of the way to the nearest other palette colour (yellow turning orange). Towards a far colour
    # the mix passes through grey, where no pixel rule can tell it from the background (docs/results.md).
    palette = torch.from_numpy(data.OBJECT_COLORS).float() / 255 * 2 - 1  # (8, 3) in [-1, 1]
    drifted = batch["video"].clone()
    for i in range(len(scene_list)):
        for k in range(int(batch["n_objects"][i])):
            own = batch["colors"][i, k].float() / 255 * 2 - 1
            target = palette[(palette - own).norm(dim=-1).argsort()[1]]
            covered = batch["masks"][i, k][:, None].expand_as(drifted[i])  # (T, 3, H, W)
            shifted = drifted[i] + 0.4 * (target[:, None, None] - drifted[i])
            drifted[i] = torch.where(covered, shifted, drifted[i])
    assert accuracy(drifted, batch)["miou"] > 0.99


def test_no_object_is_found_in_background_coloured_noise():
    batch = scenes()
    rng = torch.Generator().manual_seed(0)
    for i in range(len(batch["video"])):
        background = metrics.background_of(batch["video"][i], batch["masks"][i])
        noise = background + 0.1 * torch.randn(batch["video"][i].shape, generator=rng)
        found = metrics.segment_objects(noise, batch["colors"][i], int(batch["n_objects"][i]), background)
        assert found.sum() == 0


def test_a_shift_of_d_pixels_lowers_mask_iou_as_the_shifted_masks_iou_does():
    world = data.SpriteWorld(16, 32, batch_size=6, seed=10, n_objects=1)
    scene_list, batch = world.scenes(0), world.batch(0)
    for d in (1, 2, 4):
        moved = copy.deepcopy(scene_list)
        for scene in moved:
            scene.objects[0].centers[1:] += (d, 0)
        rendered = [data.render(s) for s in moved]
        clips = data.collate([data.to_sample(r, 32) for r in rendered])["video"]
        expected = []
        for r, masks in zip(rendered, batch["masks"]):
            target, found = masks[0, 1:].numpy(), r.masks[0, 1:]
            seen = target.any((1, 2))
            expected.append(((target & found).sum((1, 2)) / (target | found).sum((1, 2)))[seen].mean())
        assert abs(accuracy(clips, batch)["miou"] - np.mean(expected)) < 1e-6, d
        assert np.mean(expected) < 1


def test_missing_object_counts_half_the_frame():
    batch = scenes(1)
    blank = -torch.ones_like(batch["video"][0])
    blank[0] = batch["video"][0, 0]
    result = metrics.trajectory_accuracy(blank, batch["video"][0], batch["masks"][0], batch["boxes"][0],
                                         batch["colors"][0], batch["n_objects"][0])
    assert result["miou"] < 0.05 and abs(result["center_err_px"] - 16.0) < 1.0


def test_quality_statistics_see_the_failure_modes():
    truth = scenes()["video"]
    static = truth[:, :1].expand_as(truth)
    noisy = (truth + 0.3 * torch.randn_like(truth)).clamp(-1, 1)
    assert metrics.motion(static) == 0 and metrics.motion(truth) > 0.01
    assert metrics.roughness(noisy) > 2 * metrics.roughness(truth)
    assert metrics.psnr(truth, truth) > 90 and metrics.psnr(noisy, truth) < metrics.psnr(truth * 0.99, truth)
    assert metrics.clipped(torch.sign(truth)) == 1.0
    assert metrics.diversity(truth, truth) == 0 and metrics.diversity(truth, noisy) > 0
    assert set(metrics.quality(truth, truth, noisy)) == {"roughness", "motion", "clipped", "psnr", "diversity"}


def test_ssim_is_one_for_the_truth_and_falls_with_noise_and_blur():
    truth = scenes(4)["video"]
    rng = torch.Generator().manual_seed(0)
    noisy = [(truth + s * torch.randn(truth.shape, generator=rng)).clamp(-1, 1) for s in (0.05, 0.2)]
    blurred = torch.nn.functional.avg_pool2d(truth.flatten(0, 1), 3, 1, 1).view_as(truth)
    assert abs(metrics.ssim(truth, truth) - 1) < 1e-12
    assert 1 > metrics.ssim(noisy[0], truth) > metrics.ssim(noisy[1], truth)
    assert metrics.ssim(blurred, truth) < 0.95


def test_ssim_of_one_window_matches_the_formula():
    # A 7x7 frame holds exactly one 7x7 window: SSIM is the weighted-moment formula, written out here.
    rng = torch.Generator().manual_seed(1)
    x, y = (torch.rand(1, 2, 3, 7, 7, generator=rng, dtype=torch.float64) * 2 - 1 for _ in range(2))
    taps = torch.exp(-(torch.arange(7, dtype=torch.float64) - 3) ** 2 / (2 * 1.5 ** 2))
    w = torch.outer(taps, taps) / taps.sum() ** 2
    expected = []
    for c in range(3):
        a, b = x[0, 1, c], y[0, 1, c]
        ma, mb = (w * a).sum(), (w * b).sum()
        va, vb, cov = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum(), (w * (a - ma) * (b - mb)).sum()
        c1, c2 = 0.02 ** 2, 0.06 ** 2
        expected.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
    assert abs(metrics.ssim(x, y) - torch.stack(expected).mean().item()) < 1e-10


def test_bootstrap_interval_of_a_mean_has_the_textbook_width():
    values = torch.randn(400, generator=torch.Generator().manual_seed(0)).tolist()
    lo, hi = metrics.mean_interval(values)
    mean = sum(values) / len(values)
    assert lo < mean < hi
    # the standard error of a mean of 400 unit-variance values is 1/20: 95% is +-1.96/20
    assert 0.8 * 2 * 1.96 / 20 < hi - lo < 1.2 * 2 * 1.96 / 20, (lo, hi)
    assert metrics.mean_interval(values) == [lo, hi]  # seeded: the same interval every run
    assert metrics.mean_interval([0.5] * 10) == [0.5, 0.5]
    narrow = metrics.mean_interval(values * 4)  # four times the scenes: half the width
    assert 0.4 < (narrow[1] - narrow[0]) / (hi - lo) < 0.6


def test_free_objects_are_segmented_but_not_scored():
    batch = data.SpriteWorld(4, 16, batch_size=3, seed=4, n_objects=1, n_free=1).batch(0)
    for i in range(3):
        truth, free = batch["video"][i], batch["masks"][i, 1]  # free: (T, H, W), the free object (in front)
        video = torch.where(free[:, None], metrics.background_of(truth, batch["masks"][i, :2])[None], truth)  # gone
        scored = metrics.trajectory_accuracy(video, batch["video"][i], batch["masks"][i], batch["boxes"][i],
                                             batch["colors"][i], batch["n_objects"][i], batch["controlled"][i])
        both = metrics.trajectory_accuracy(video, batch["video"][i], batch["masks"][i], batch["boxes"][i],
                                           batch["colors"][i], batch["n_objects"][i])
        assert scored["miou"] == pytest.approx(1.0) and both["miou"] < 1.0, (scored, both)
