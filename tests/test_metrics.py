import torch

import data
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
    result = metrics.trajectory_accuracy(video, masks, boxes, colors, 1)
    assert abs(result["center_err_px"] - 3.0) < 1e-5
    assert abs(result["miou"] - 18 / 54) < 1e-5  # 6x3 overlap over 6x9 union
    assert abs(result["box_iou"] - 18 / 54) < 1e-5


def test_missing_object_counts_half_the_frame():
    batch = scenes(1)
    blank = -torch.ones_like(batch["video"][0])
    blank[0] = batch["video"][0, 0]
    result = metrics.trajectory_accuracy(blank, batch["masks"][0], batch["boxes"][0], batch["colors"][0],
                                         batch["n_objects"][0])
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
