import json
import os
import subprocess
import sys

import pytest
import torch

import common
import data
from adapter import ADAPTERS, Controlled, adapter_from_checkpoint, build_adapter
from model import build_model, config_dict, flow_matching_loss
from test_model import random_final_layer


def micro_generator(seed=0):
    torch.manual_seed(seed)
    return random_final_layer(build_model("micro")).requires_grad_(False)


def micro_batch(seed=0, batch_size=2):
    return data.SpriteWorld(4, 16, batch_size=batch_size, seed=seed).batch(0)


def generator_checkpoint(path, generator, run_id):
    common.save_checkpoint(path, {"kind": "slow_generator", "run_id": run_id, "parent": None, "step": 0,
                                  "model_config": config_dict(generator), "ema": generator.state_dict()})
    return common.load_checkpoint(path)


def adapter_checkpoint(path, adapter, generator, parent, run_id="adapter-run", parent_path="slow.pt"):
    """A slow-adapter checkpoint of `adapter`, trained (as far as it says) on run `parent`."""
    common.save_checkpoint(path, {
        "kind": "slow_adapter", "run_id": run_id, "parent": parent, "parent_path": parent_path,
        "generator_config": config_dict(generator), "adapter_config": adapter.config(),
        "condition": adapter.condition, "model": adapter.state_dict(), "ema": adapter.state_dict()})


@pytest.mark.parametrize("kind", ADAPTERS)
def test_fresh_adapter_is_exactly_the_generator(kind):
    generator = micro_generator()
    controlled = Controlled(generator, build_adapter(kind, generator))
    batch = micro_batch()
    x, t = torch.randn(2, 4, 3, 16, 16), torch.tensor([0.3, 0.9])
    base = generator(x, t, batch["video"][:, 0])
    for traj_keep in (None, torch.tensor([1.0, 0.0])):
        adapted = controlled(x, t, batch["video"][:, 0], trajectory=batch["box_maps"], traj_keep=traj_keep)
        assert torch.equal(adapted, base)


@pytest.mark.parametrize("kind", ADAPTERS)
def test_only_adapter_parameters_get_gradients_and_they_all_do(kind):
    generator = micro_generator()
    adapter = build_adapter(kind, generator)
    controlled = Controlled(generator, adapter)
    batch = micro_batch()
    # One step first: zero-initialised layers pass no gradient to what feeds
    # them until they have moved.
    optimizer = torch.optim.SGD(adapter.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        flow_matching_loss(controlled, batch["video"], batch["video"][:, 0], torch.Generator().manual_seed(0),
                             trajectory=batch["box_maps"]).backward()
        optimizer.step()
    assert all(p.grad is None for p in generator.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.parameters())


@pytest.mark.parametrize("kind", ADAPTERS)
def test_adapter_lowers_the_loss_on_a_fixed_batch(kind):
    generator = micro_generator()
    adapter = build_adapter(kind, generator)
    controlled = Controlled(generator, adapter)
    batch = micro_batch(batch_size=4)
    video, noise, t = batch["video"], torch.randn_like(batch["video"]), torch.rand(4) * 0.8 + 0.1
    optimizer = torch.optim.Adam(adapter.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        loss = flow_matching_loss(controlled, video, video[:, 0], t=t, noise=noise, trajectory=batch["box_maps"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], (losses[0], losses[-1])


def test_the_resnet_adapter_reads_the_maps_alone():
    """Its steering is one residual per DiT block computed from the maps only:
    any noisy clip at any time gets exactly those residuals added."""
    generator = micro_generator()
    adapter = build_adapter("resnet", generator)
    assert len(adapter.blocks) == len(adapter.outputs) == generator.cfg.depth
    for layer in adapter.outputs:
        torch.nn.init.normal_(layer.weight, std=0.1)
    controlled = Controlled(generator, adapter)
    batch = micro_batch()
    residuals = adapter.residuals(generator, batch["box_maps"])
    for seed in (0, 1):
        torch.manual_seed(seed)
        x, t = torch.randn(2, 4, 3, 16, 16), torch.rand(2)
        steered = controlled(x, t, batch["video"][:, 0], trajectory=batch["box_maps"])
        assert torch.equal(steered, generator(x, t, batch["video"][:, 0], block_residuals=residuals))
        assert not torch.allclose(steered, generator(x, t, batch["video"][:, 0]))
    other = adapter.residuals(generator, batch["box_maps"].roll(4, dims=-1))
    assert not torch.allclose(other[0], residuals[0])  # the maps do matter
    with pytest.raises(ValueError, match="width must be a positive multiple of 8"):
        build_adapter("resnet", generator, width=12)


def test_trajectory_dropout_is_a_distinct_condition():
    generator = micro_generator()
    adapter = build_adapter("controlnet", generator)
    torch.nn.init.normal_(adapter.trajectory_embed.weight, std=0.1)
    for layer in adapter.outputs:
        torch.nn.init.normal_(layer.weight, std=0.1)
    controlled = Controlled(generator, adapter)
    batch = micro_batch()
    x, t, first = torch.randn(2, 4, 3, 16, 16), torch.rand(2), batch["video"][:, 0]
    kept = controlled(x, t, first, trajectory=batch["box_maps"])
    dropped = controlled(x, t, first, trajectory=batch["box_maps"], traj_keep=torch.zeros(2))
    # Dropped: the maps no longer matter, and the result differs from kept.
    other_maps = controlled(x, t, first, trajectory=torch.rand_like(batch["box_maps"]), traj_keep=torch.zeros(2))
    assert torch.equal(dropped, other_maps) and not torch.allclose(kept, dropped)


@pytest.mark.parametrize("kind", ADAPTERS)
def test_checkpoint_round_trip_and_wrong_generator_refused(kind, tmp_path):
    generator = micro_generator()
    parent = generator_checkpoint(tmp_path / "gen.pt", generator, "run-a")
    adapter = build_adapter(kind, generator)
    for p in adapter.parameters():
        torch.nn.init.normal_(p, std=0.05)
    adapter_checkpoint(tmp_path / "adapter.pt", adapter, generator, "run-a", run_id="x",
                       parent_path=str(tmp_path / "gen.pt"))
    ckpt = common.load_checkpoint(tmp_path / "adapter.pt", kind="slow_adapter")
    loaded = adapter_from_checkpoint(ckpt, generator, parent)
    batch = micro_batch()
    x, t = torch.randn(2, 4, 3, 16, 16), torch.rand(2)
    run = lambda a: Controlled(generator, a)(x, t, batch["video"][:, 0], trajectory=batch["box_maps"])
    assert torch.equal(run(loaded), run(adapter))

    other = generator_checkpoint(tmp_path / "other.pt", micro_generator(seed=1), "run-b")
    with pytest.raises(ValueError, match="trained on the generator checkpoint"):
        adapter_from_checkpoint(ckpt, micro_generator(seed=1), other)
    # Asked for on purpose (the naive pairing), it loads.
    adapter_from_checkpoint(ckpt, micro_generator(seed=1), other, allow_other_generator=True)


def run_adapter(*args):
    return subprocess.run([sys.executable, "train_adapter.py", "--config=micro", "--batch_size=2", "--num_workers=0",
                           "--ckpt_interval=2", "--eval_scenes=2", "--sample_steps=2", "--init_from=none", *args],
                          capture_output=True, text=True)


def test_training_script_runs_resumes_and_measures(tmp_path):
    generator_checkpoint(tmp_path / "gen.pt", micro_generator(), "run-a")
    gen = f"--generator_ckpt={tmp_path / 'gen.pt'}"
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    result = run_adapter(gen, "--max_steps=4", "--sample_interval=4", f"--out_dir={straight}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "held-out mIoU" in result.stdout + result.stderr
    assert (straight / "samples" / "step_000004.gif").exists()
    assert run_adapter(gen, "--max_steps=4", "--stop_at=2", "--sample_interval=0",
                       f"--out_dir={interrupted}").returncode == 0
    assert run_adapter(gen, "--max_steps=4", "--sample_interval=0", "--resume=true",
                       f"--out_dir={interrupted}").returncode == 0
    a, b = common.load_checkpoint(straight / "ckpt.pt"), common.load_checkpoint(interrupted / "ckpt.pt")
    assert a["step"] == b["step"] == 4 and a["parent"] == "run-a"
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_masks_then_boxes(tmp_path):
    """--mask_first: the first share of the steps reads mask maps, the rest box maps; the adapter is a box one."""
    generator_checkpoint(tmp_path / "gen.pt", micro_generator(), "run-a")
    result = run_adapter(f"--generator_ckpt={tmp_path / 'gen.pt'}", "--condition=box", "--max_steps=4",
                         "--mask_first=0.5", "--sample_interval=0", f"--out_dir={tmp_path / 'run'}")
    assert result.returncode == 0, result.stderr[-2000:]
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["maps"] for r in log] == ["mask", "mask", "box", "box"]
    assert common.load_checkpoint(tmp_path / "run" / "ckpt.pt")["condition"] == "box"


def test_init_from_moves_a_box_adapter_to_mask_maps(tmp_path):
    """--init_from starts from another adapter's weights (box maps, here), and refuses another kind."""
    generator = micro_generator()
    generator_checkpoint(tmp_path / "gen.pt", generator, "run-a")
    box_adapter = build_adapter("controlnet", generator, "box")
    with torch.no_grad():
        for p in box_adapter.parameters():
            p.add_(torch.randn_like(p))
    adapter_checkpoint(tmp_path / "box.pt", box_adapter, generator, "run-a")
    gen, source = f"--generator_ckpt={tmp_path / 'gen.pt'}", f"--init_from={tmp_path / 'box.pt'}"
    result = run_adapter(gen, source, "--condition=mask", "--lr=0", "--max_steps=2", "--sample_interval=0",
                         f"--out_dir={tmp_path / 'mask'}")
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = common.load_checkpoint(tmp_path / "mask" / "ckpt.pt")
    assert ckpt["condition"] == "mask" and [r["maps"] for r in map(json.loads, open(tmp_path / "mask" / "log.jsonl"))] \
        == ["mask", "mask"]
    for key, value in box_adapter.state_dict().items():  # lr 0: the box adapter's weights, unchanged
        assert torch.equal(ckpt["model"][key], value), key
    result = run_adapter(gen, source, "--adapter=lora", "--max_steps=2", f"--out_dir={tmp_path / 'lora'}")
    assert result.returncode == 1 and "--init_from" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("flag, message", [("--adapter=dora", "--adapter must be one of"),
                                           ("--condition=points", "--condition must be one of"),
                                           ("--mask_first=1.5", "--mask_first must be in [0, 1)"),
                                           ("--condition=mask --mask_first=0.3", "--mask_first must be"),
                                           ("--max_free=-1", "--max_free must not be negative"),
                                           ("--generator_ckpt=nowhere.pt", "checkpoint not found")])
def test_bad_flags_fail_with_one_line(flag, message, tmp_path):
    result = run_adapter(*flag.split(), f"--out_dir={tmp_path}")
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert not os.listdir(tmp_path)
