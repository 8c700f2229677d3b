"""A script run bare rebuilds what ships: its defaults are the recipe recorded
in the `train_config` of its shipped tiny checkpoint, and pipeline.sh's few
flags make the others. Paths, run control and worker counts are left out of
the comparison; the run's length is checked against the checkpoint's step."""

import os

import pytest

import common
import consistency
import distill
import hybrid_finetune
import train
import train_adapter
import train_autoencoder
import train_fvd
from model import TIME_SHIFT

BOX = ["--condition=box", "--init_from=none", "--mask_first=0.46", "--max_steps=4000", "--lr=5e-4", "--warmup=100",
       "--sample_interval=500"]  # pipeline.sh's box adapter
SHIPPED = [  # (script, checkpoint, the flags pipeline.sh adds; none for the default family's own)
    (train_fvd, "video_encoder_tiny.pt", []),
    (train_autoencoder, "autoencoder_tiny.pt", []),
    (train, "slow_generator_tiny.pt", []),
    (train_adapter, "slow_adapter_controlnet_mask_tiny.pt", []),
    (train_adapter, "slow_adapter_lora_mask_tiny.pt", ["--adapter=lora"]),
    (train_adapter, "slow_adapter_controlnet_tiny.pt", BOX),
    (train_adapter, "slow_adapter_lora_tiny.pt", ["--adapter=lora", *BOX]),
    (train_adapter, "slow_adapter_resnet_mask_tiny.pt", ["--recipe=resnet"]),
    (distill, "fast_generator_tiny.pt", []),
    (distill, "dmd_joint_mask_tiny.pt", ["--recipe=dmd_joint"]),
    (distill, "dmd_joint_tiny.pt", ["--recipe=dmd_joint"]),
    (distill, "dmd_joint_resnet_mask_tiny.pt", ["--recipe=dmd_joint"]),
    (consistency, "lcm_joint_mask_tiny.pt", []),
    (hybrid_finetune, "fast_adapter_hybrid_controlnet_mask_tiny.pt", []),
    *[(hybrid_finetune, f"fast_adapter_{loss}_controlnet_mask_tiny.pt", [f"--loss={loss}"])
      for loss in ("fixed_lambda", "diffusion", "adversarial")],
    *[(hybrid_finetune, f"fast_adapter_{loss}_{family}_tiny.pt", [f"--loss={loss}"])
      for family in ("lora", "resnet_mask") for loss in hybrid_finetune.LOSSES],  # every loss of these families
    (hybrid_finetune, "fast_adapter_hybrid_controlnet_tiny.pt", []),
]
NOT_RECIPE = {"out_dir", "export", "resume", "stop_at", "time_limit", "num_workers", "threads", "compile",
              "ckpt_interval", "sample_interval", "generator_ckpt", "teacher_ckpt", "adapter_ckpt",
              "fast_generator_ckpt", "slow_generator_ckpt", "init_from", "features", "autoencoder", "data_dir"}
# Options that have left the scripts, and the value the code now always takes (every shipped run used it).
REMOVED = {"codec": "", "time_shift": TIME_SHIFT, "discriminator": "query",
           "diffusion_steps": "0,1,2,3", "disc_max_t": hybrid_finetune.DISC_MAX_T, "disc_steps": 1, "mismatch": False}


@pytest.mark.parametrize("script, name, flags", SHIPPED, ids=[name for _, name, _ in SHIPPED])
def test_defaults_rebuild_the_shipped_checkpoint(script, name, flags):
    path = os.path.join("checkpoints", name)
    if not os.path.exists(path):
        pytest.skip(f"{path} is not shipped")
    ckpt = common.load_checkpoint(path)
    recorded = ckpt["train_config"]
    opt = common.parse_flags(script.FLAGS, flags, script.__doc__, getattr(script, "RECIPES", None))
    differences = {key: (getattr(opt, key), value) for key, value in recorded.items()
                   if key in script.FLAGS and key not in NOT_RECIPE and getattr(opt, key) != value}
    assert not differences, differences  # (default, shipped)
    for key, value in recorded.items():
        assert key in script.FLAGS or REMOVED[key] == value, (key, value)
    assert min(opt.stop_at or opt.max_steps, opt.max_steps) == ckpt["step"]  # the run stops where it stopped
    if script is distill:  # flags newer than the run: their defaults are what the run did
        assert opt.fast_shift == ckpt["time_shift"]
    if script is train_adapter:
        assert opt.max_free == recorded.get("max_free", 0)


def test_the_mask_adapter_continues_the_box_one_by_default():
    opt = common.parse_flags(train_adapter.FLAGS, [], train_adapter.__doc__)
    train_adapter.check_flags(opt)
    shipped = common.load_checkpoint("checkpoints/slow_adapter_controlnet_mask_tiny.pt")["train_config"]
    assert opt.init_from == shipped["init_from"] == "checkpoints/slow_adapter_controlnet_tiny.pt"
    box = common.parse_flags(train_adapter.FLAGS, ["--condition=box"], train_adapter.__doc__)
    train_adapter.check_flags(box)
    assert box.init_from == "none" and box.out_dir == "runs/slow_adapter_controlnet_tiny"


def test_small_config_switches_to_the_small_recipe_and_a_given_flag_wins():
    small = common.parse_flags(train.FLAGS, ["--config=small"], train.__doc__, train.RECIPES)
    assert (small.batch_size, small.max_steps, small.stop_at) == (64, 40000, 0)
    given = common.parse_flags(train.FLAGS, ["--config=small", "--batch_size=16"], train.__doc__, train.RECIPES)
    assert given.batch_size == 16 and given.max_steps == 40000
    tiny = common.parse_flags(train.FLAGS, [], train.__doc__, train.RECIPES)
    assert (tiny.batch_size, tiny.max_steps) == (128, 4800)


@pytest.mark.parametrize("script", [train, train_adapter, distill, consistency, hybrid_finetune])
def test_the_lab_recipe_is_a_named_flag_set_and_a_given_flag_wins(script):
    lab = common.parse_flags(script.FLAGS, ["--recipe=lab"], script.__doc__, script.RECIPES)
    assert {key: getattr(lab, key) for key in script.RECIPES["lab"]} == script.RECIPES["lab"]
    assert lab.out_dir.startswith("runs/lab_") and lab.num_workers == 0 and lab.threads == 1  # one thread, no workers
    given = common.parse_flags(script.FLAGS, ["--max_steps=3", "--recipe=lab"], script.__doc__, script.RECIPES)
    assert given.max_steps == 3 and given.out_dir == lab.out_dir
    with pytest.raises(SystemExit, match="--recipe must be one of small, lab(, \\w+)?, got 'labs'"):
        common.parse_flags(script.FLAGS, ["--recipe=labs"], script.__doc__, script.RECIPES)
