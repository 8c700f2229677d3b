import pytest
import torch

from model import (T_MIN, add_noise, apply_rope, build_model, clean_estimate, euler_sample, flow_matching_loss,
                   generate, rope_3d, sampling_times, shift_time)


def random_final_layer(model):
    """adaLN-Zero makes a fresh model output exactly zero; give the output
    layers weights so that tests can see the inputs matter."""
    torch.manual_seed(1)
    for layer in (model.final_ada_ln[-1], model.final_linear):
        torch.nn.init.normal_(layer.weight, std=0.1)
    for block in model.blocks:
        torch.nn.init.normal_(block.ada_ln[-1].weight, std=0.1)
    return model


@pytest.mark.parametrize("name, tokens, params", [("tiny", 512, (0.8e6, 1.5e6)), ("small", 2048, (20e6, 40e6))])
def test_shapes_for_each_config(name, tokens, params):
    model = build_model(name)
    cfg = model.cfg
    x = torch.randn(1, *model.space)
    with torch.no_grad():
        out, features = model(x, torch.tensor([0.5]), x[:, 0], return_features=True)
    assert out.shape == x.shape
    assert len(features) == cfg.depth and features[0].shape == (1, tokens, cfg.dim)
    n = sum(p.numel() for p in model.parameters())
    assert params[0] < n < params[1]


def test_fresh_model_predicts_a_zero_clean_video():
    # adaLN-Zero zeroes the network's output, the clean-video prediction, so
    # a fresh model's velocity is (x_t - 0) / t, with t clamped at T_MIN.
    model = build_model("micro")
    x, t = torch.randn(3, 4, 3, 16, 16), torch.tensor([0.01, 0.3, 0.8])
    expected = x / t.clamp(min=T_MIN).view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(model(x, t, None), expected)
    torch.testing.assert_close(clean_estimate(x, model(x, t, None), t)[1:], torch.zeros_like(x[1:]))


def test_patchify_round_trip():
    model = build_model("micro")
    x = torch.randn(2, 4, 3, 16, 16)
    tokens = model.patchify(x)
    assert tokens.shape == (2, 2 * 4 * 4, 2 * 4 * 4 * 3)
    assert torch.equal(model.unpatchify(tokens), x)
    # a token holds one spatio-temporal patch: frames 0-1, rows 0-3, columns 4-7
    assert torch.equal(tokens[0, 1].reshape(2, 4, 4, 3), x[0, 0:2, :, 0:4, 4:8].permute(0, 2, 3, 1))


def test_rope_depends_only_on_relative_position():
    cos, sin = rope_3d((6, 1, 1), head_dim=12)
    q, k = torch.randn(12), torch.randn(12)
    rot = lambda x, i: apply_rope(x.view(1, 1, 1, 12), cos[i:i + 1], sin[i:i + 1]).flatten()
    torch.testing.assert_close(rot(q, 1) @ rot(k, 3), rot(q, 2) @ rot(k, 4))
    torch.testing.assert_close(rot(q, 4).norm(), q.norm())
    assert not torch.allclose(rot(q, 1) @ rot(k, 3), rot(q, 1) @ rot(k, 5))


def test_hooks_change_the_output_where_they_should():
    model = random_final_layer(build_model("micro"))
    x, t = torch.randn(2, 4, 3, 16, 16), torch.rand(2)
    base = model(x, t, x[:, 0])
    zeros = [torch.zeros(2, 32, 32) for _ in model.blocks]
    torch.testing.assert_close(model(x, t, x[:, 0], block_residuals=zeros, token_residual=zeros[0]), base)
    bump = torch.randn(2, 32, 32)
    assert not torch.allclose(model(x, t, x[:, 0], block_residuals=[None, bump]), base)
    assert not torch.allclose(model(x, t, x[:, 0], token_residual=bump), base)


def test_first_frame_and_its_dropout():
    model = random_final_layer(build_model("micro"))
    x, t = torch.randn(2, 4, 3, 16, 16), torch.rand(2)
    frame = torch.randn(2, 3, 16, 16)
    dropped = model(x, t, None)
    torch.testing.assert_close(model(x, t, frame, keep=torch.zeros(2)), dropped)
    assert not torch.allclose(model(x, t, frame), dropped)
    mixed = model(x, t, frame, keep=torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(mixed[1], dropped[1])
    torch.testing.assert_close(mixed[0], model(x, t, frame)[0])


def test_given_first_frame_is_pinned_exactly():
    model = random_final_layer(build_model("micro"))
    frame = torch.rand(2, 3, 16, 16) * 2 - 1
    # Any step count lands frame 0 on the given first frame, frames 1.. move.
    for steps in (1, 4):
        video = generate(model, frame, steps=steps, rng=torch.Generator().manual_seed(0))
        torch.testing.assert_close(video[:, 0], frame.clamp(-1, 1))
        assert not torch.allclose(video[:, 1], frame, atol=0.1)
    # Frame 0 of the noisy input is not read where the first frame is given...
    x, t = torch.randn(2, 4, 3, 16, 16), torch.rand(2)
    other = x.clone()
    other[:, 0] = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x, t, frame)[:, 1:], model(other, t, frame)[:, 1:])
    # ...but it is where the first frame is dropped.
    assert not torch.allclose(model(x, t, None)[:, 1:], model(other, t, None)[:, 1:])


def losses_on_a_fixed_batch(model, video, steps):
    """Flow-matching losses of `steps` Adam steps on one batch, with fixed noise and times."""
    noise, t = torch.randn_like(video), torch.rand(len(video))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(steps):
        loss = flow_matching_loss(model, video, video[:, 0], t=t, noise=noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_flow_matching_loss_halves_on_a_fixed_batch():
    torch.manual_seed(0)
    losses = losses_on_a_fixed_batch(build_model("micro"), torch.rand(4, 4, 3, 16, 16) * 2 - 1, 150)
    assert losses[-1] < 0.5 * losses[0], (losses[0], losses[-1])


def test_euler_sampler_is_exact_on_a_straight_path():
    # For x_t = (1 - t) x0 + t n the true velocity n - x0 = (x_t - x0) / t is
    # constant along the path, so Euler lands exactly on x0 at any step count.
    x0, noise = torch.randn(2, 3), torch.randn(2, 3)
    velocity = lambda x, t: (x - x0) / t[:, None]
    for steps, shift in [(1, 1.0), (4, 3.0), (50, 1.0)]:
        out = euler_sample(velocity, noise, shift_time(torch.linspace(1, 0, steps + 1), shift))
        torch.testing.assert_close(out, x0)


def test_time_shift_and_schedule():
    times = sampling_times(4)  # model.TIME_SHIFT = 3
    assert times[0] == 1 and times[-1] == 0 and torch.all(times[1:] < times[:-1])
    assert times[2] > 0.5  # shift > 1 spends more of the steps at high noise
    torch.testing.assert_close(clean_estimate(add_noise(torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([0.3, 0.9])),
                                                -torch.ones(2, 3), torch.tensor([0.3, 0.9])), torch.ones(2, 3))


def test_guidance_scale_one_is_the_conditional_model():
    model = random_final_layer(build_model("micro"))
    frame = torch.randn(1, 3, 16, 16)
    a = generate(model, frame, steps=3, guidance=1.0, rng=torch.Generator().manual_seed(0))
    b = generate(model, frame, steps=3, guidance=1.0, rng=torch.Generator().manual_seed(0))
    c = generate(model, frame, steps=3, guidance=3.0, rng=torch.Generator().manual_seed(0))
    assert a.shape == (1, 4, 3, 16, 16) and torch.equal(a, b) and not torch.allclose(a, c)
