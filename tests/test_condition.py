"""An adapter trained on mask maps is fed mask maps by every later stage:
dmd-joint, the stage-3 finetune, and the methods of sample.py / bench.py
(which find the mask family by its files' _mask names)."""

import shutil

import pytest

import adapter
import common
import data
import distill
import hybrid_finetune
import sample
import train_adapter
from model import config_dict
from test_adapter import generator_checkpoint, micro_generator

MASK, BOX = 0.25, 0.75  # what each kind of map holds where it is not black, in this test


def test_mask_adapter_reads_mask_maps_in_every_stage(tmp_path, monkeypatch):
    real_maps = data.trajectory_maps

    def marked_maps(masks, boxes, size, controlled=None):  # the two kinds told apart by their value alone
        mask_maps, box_maps = real_maps(masks, boxes, size, controlled)
        return (mask_maps > 0).float() * MASK, (box_maps > 0).float() * BOX

    seen = []
    real_channels = adapter.trajectory_channels

    def spy(trajectory, traj_keep):  # every map that reaches an adapter
        seen.append(set(trajectory.unique().tolist()))
        return real_channels(trajectory, traj_keep)

    monkeypatch.setattr(data, "trajectory_maps", marked_maps)
    monkeypatch.setattr(adapter, "trajectory_channels", spy)

    def only_mask_maps_reached_the_adapter():
        assert seen and all(values <= {0.0, MASK} for values in seen) and any(MASK in v for v in seen), seen
        seen.clear()

    folder = tmp_path / "checkpoints"
    slow = micro_generator()
    generator_checkpoint(folder / "slow_generator_micro.pt", slow, "slow-run")
    common.save_checkpoint(folder / "fast_generator_micro.pt", {
        "kind": "fast_generator", "run_id": "fast-run", "time_shift": 3.0, "parent": "slow-run", "parent_path": "slow.pt",
        "model_config": config_dict(slow), "ema": micro_generator(seed=3).state_dict()})
    micro = ["--config=micro", "--batch_size=2", "--num_workers=0", "--max_steps=2", "--sample_interval=2"]

    def trained(kind, script, name, *args):
        script.main([*micro, f"--out_dir={tmp_path / name}", *args])
        ckpt = common.load_checkpoint(tmp_path / name / "ckpt.pt", kind=kind)
        assert ckpt["condition"] == "mask"
        common.export_checkpoint(tmp_path / name / "ckpt.pt", folder / f"{name}_micro.pt")
        only_mask_maps_reached_the_adapter()

    trained("slow_adapter", train_adapter, "slow_adapter_controlnet_mask", "--init_from=none", "--eval_scenes=2",
            "--sample_steps=2", f"--generator_ckpt={folder / 'slow_generator_micro.pt'}")
    slow_adapter = f"--adapter_ckpt={folder / 'slow_adapter_controlnet_mask_micro.pt'}"
    trained("dmd_joint", distill, "dmd_joint_mask", "--controlled=true", "--ratio=1", slow_adapter,
            f"--teacher_ckpt={folder / 'slow_generator_micro.pt'}")
    trained("fast_adapter", hybrid_finetune, "fast_adapter_hybrid_controlnet_mask", "--eval_scenes=2",
            "--disc_blocks=0,1", slow_adapter, f"--slow_generator_ckpt={folder / 'slow_generator_micro.pt'}",
            f"--fast_generator_ckpt={folder / 'fast_generator_micro.pt'}")

    scenes = data.SpriteWorld(4, 16, batch_size=2, seed=5).batch(0)
    for name in ("teacher", "naive", "dmd-joint", "flashmotion"):
        method = sample.load_method(name, "micro", condition="mask", folder=str(folder), teacher_steps=2)
        assert method.model.adapter.condition == "mask"
        sample.generate_clips(method, scenes, guidance=2.0)
        only_mask_maps_reached_the_adapter()

    # A mask adapter under a box adapter's name is refused, not silently fed box maps.
    shutil.copy(folder / "slow_adapter_controlnet_mask_micro.pt", folder / "slow_adapter_controlnet_micro.pt")
    with pytest.raises(common.UserError, match="reading mask maps, not the box maps"):
        sample.load_method("teacher", "micro", condition="box", folder=str(folder))
