import json
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import torch

import common
import data
import degrade
import fvd
from adapter import build_adapter
from model import config_dict, model_from_checkpoint
from test_adapter import adapter_checkpoint, generator_checkpoint, micro_generator
from test_hybrid import trained_looking_adapter


def micro_checkpoints(folder):
    slow = micro_generator()
    generator_checkpoint(folder / "slow_generator_micro.pt", slow, "slow-run")
    adapter = trained_looking_adapter(slow, condition="mask")  # the default family: mask maps
    adapter_checkpoint(folder / "slow_adapter_controlnet_mask_micro.pt", adapter, slow, "slow-run")
    common.save_checkpoint(folder / "fast_generator_micro.pt", {
        "kind": "fast_generator", "run_id": "fast-run", "time_shift": 3.0, "parent": "slow-run", "parent_path": "slow.pt",
        "model_config": config_dict(slow), "ema": micro_generator(seed=3).state_dict(), "optimizer": {}})
    encoder_checkpoint(folder / "video_encoder_micro.pt")


def encoder_checkpoint(path):
    """A micro FlashBench feature network (untrained) with its real statistics, as train_fvd.py exports."""
    encoder = fvd.VideoEncoder(4, 16, width=8)
    frame_reference, clip_reference = fvd.reference_statistics(encoder, "micro", 16, seed=1)
    common.save_checkpoint(path, {
        "kind": "video_encoder", "config": encoder.config(), "encoder": encoder.state_dict(),
        "frame_reference": frame_reference, "clip_reference": clip_reference, "shapes": list(data.RANDOM_SHAPES)})


def bench(*args):
    return subprocess.run([sys.executable, "bench.py", "--config=micro", "--scenes_per_count=1",
                           "--teacher_steps=3", *args], capture_output=True, text=True)


def test_bench_runs_every_available_method_and_writes_json(tmp_path):
    micro_checkpoints(tmp_path)
    result = bench(f"--checkpoints={tmp_path}", f"--json={tmp_path / 'r.json'}", f"--gif={tmp_path / 'b.gif'}")
    assert result.returncode == 0, result.stderr[-2000:]
    methods = ["generator", "teacher", "teacher-4", "fast-generator", "naive"]
    for name in methods:
        assert f"| {name} |" in result.stdout
    saved = json.loads((tmp_path / "r.json").read_text())["methods"]
    assert list(saved) == methods
    for name in methods:
        assert {"fid", "fvd", "miou", "box_iou", "center_err_px", "psnr", "ssim", "nfe", "ms_per_video",
                "by_objects"} <= set(saved[name])
        assert saved[name]["fid"] >= 0 and saved[name]["fvd"] >= 0 and -1 <= saved[name]["ssim"] <= 1
        assert len(saved[name]["by_objects"]) == 6 and 0 <= saved[name]["miou"] <= 1
        for key in ("fid", "fvd", "miou", "box_iou", "center_err_px", "psnr", "ssim", "roughness", "diversity"):
            lo, hi = saved[name][f"{key}_ci"]  # 95% intervals over the scenes
            assert lo <= hi and (key in ("fid", "fvd") or lo <= saved[name][key] <= hi), (name, key)
    assert saved["teacher"]["nfe"] == 6 and saved["naive"]["nfe"] == 4  # CFG: two calls per step
    assert (tmp_path / "b.gif").exists()
    # Paired differences: the default claims among the measured methods (here only naive - teacher).
    pairs = json.loads((tmp_path / "r.json").read_text())["pairs"]
    assert list(pairs) == ["naive − teacher"] and "Paired differences" in result.stdout
    difference = pairs["naive − teacher"]
    assert abs(difference["miou"] - (saved["naive"]["miou"] - saved["teacher"]["miou"])) < 1e-9
    assert abs(difference["fid"] - (saved["naive"]["fid"] - saved["teacher"]["fid"])) < 1e-9
    assert all(difference[f"{k}_ci"][0] <= difference[f"{k}_ci"][1] for k in ("miou", "box_iou", "fid", "fvd"))


def test_asked_pairs_must_be_measured_methods(tmp_path):
    micro_checkpoints(tmp_path)
    result = bench(f"--checkpoints={tmp_path}", "--methods=naive,teacher", "--pairs=naive:flashmotion")
    assert result.returncode == 1 and "--pairs" in result.stderr and "Traceback" not in result.stderr


def test_instruments_measure_every_degradation_beside_two_real_sets(tmp_path):
    micro_checkpoints(tmp_path)
    result = bench(f"--checkpoints={tmp_path}", "--instruments", f"--json={tmp_path / 'i.json'}")  # bare: true
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((tmp_path / "i.json").read_text())["instruments"]
    assert list(rows) == ["real, set A", "real, set B"] + [
        f"{kind} {strength}" for kind, (_, strengths, _) in degrade.DEGRADATIONS.items() for strength in strengths]
    for name, row in rows.items():
        assert row["fid"] >= 0 and row["fvd"] >= 0 and f"| {name} |" in result.stdout
    assert rows["real, set A"]["miou"] == 1.0 and rows["fade 0.3"]["miou"] == 1.0  # colour is FID's business
    assert rows["freeze 1.0"]["miou"] < 1 and rows["freeze 1.0"]["motion"] == 0
    assert "miou" not in rows["real, set B"]  # the floor's second set is only there for FID and FVD


def test_missing_checkpoint_says_how_to_make_it(tmp_path):
    micro_checkpoints(tmp_path)
    result = bench(f"--checkpoints={tmp_path}", "--methods=flashmotion")
    assert result.returncode == 1 and "hybrid_finetune.py" in result.stderr and "Traceback" not in result.stderr
    result = bench(f"--checkpoints={tmp_path}", "--methods=best")
    assert result.returncode == 1 and "unknown method 'best'" in result.stderr
    (tmp_path / "video_encoder_micro.pt").unlink()
    result = bench(f"--checkpoints={tmp_path}", "--methods=naive")
    assert result.returncode == 1 and "python train_fvd.py" in result.stderr and "Traceback" not in result.stderr


def test_a_missing_joint_pair_names_its_familys_adapter():
    make = lambda name: common.how_to_make(f"checkpoints/{name}")  # noqa: E731
    assert "consistency.py --adapter_ckpt=checkpoints/slow_adapter_lora_mask_tiny.pt" in make(
        "lcm_joint_lora_mask_tiny.pt")
    assert "--recipe=dmd_joint --adapter_ckpt=checkpoints/slow_adapter_controlnet_tiny.pt" in make("dmd_joint_tiny.pt")
    assert "--adapter_ckpt=checkpoints/slow_adapter_resnet_mask_tiny.pt" in make("dmd_joint_resnet_mask_tiny.pt")
    assert "--adapter_ckpt" not in make("fast_generator_tiny.pt")


def test_exported_checkpoint_keeps_weights_and_lineage_only(tmp_path):
    micro_checkpoints(tmp_path)
    common.export_checkpoint(tmp_path / "fast_generator_micro.pt", tmp_path / "slim.pt")
    slim = common.load_checkpoint(tmp_path / "slim.pt", kind="fast_generator")
    assert "optimizer" not in slim and slim["parent"] == "slow-run" and "ema" in slim
    # weights ship in fp16 and load back into an fp32 model, rounded and nothing else
    full = common.load_checkpoint(tmp_path / "fast_generator_micro.pt")["ema"]
    assert {tensor.dtype for tensor in slim["ema"].values()} == {torch.float16}
    model = model_from_checkpoint(slim)
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, full[name].half().float()), name


def micro_scene(path, objects, **extra):
    path.write_text(json.dumps({"size": 16, "frames": 4, "background": {"kind": "solid", "seed": 1},
                                "objects": objects, **extra}))


def test_scene_folder_runs_its_files_and_refuses_what_it_cannot_measure(tmp_path):
    micro_checkpoints(tmp_path)
    folder = tmp_path / "scenes"
    folder.mkdir()
    circle = {"shape": "circle", "color": [230, 40, 40], "size": 4, "path": [[3, 3], [12, 12]]}
    square = {"shape": "square", "color": [40, 200, 60], "size": 4, "path": [[12, 3], [3, 12]]}
    cross = {"shape": "cross", "color": [50, 90, 240], "size": 5, "path": [[8, 2], [8, 13]]}
    micro_scene(folder / "a.json", [circle])
    micro_scene(folder / "b.json", [square, cross])
    result = bench(f"--checkpoints={tmp_path}", f"--scenes={folder}", "--methods=naive",
                   f"--json={tmp_path / 'r.json'}")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((tmp_path / "r.json").read_text())["methods"]["naive"]
    assert sorted(saved["by_objects"]) == ["1", "2"]  # the two files' object counts, nothing else
    assert bench(f"--checkpoints={tmp_path}", f"--scenes={tmp_path / 'none'}").returncode == 1
    iio.imwrite(folder / "first.png", np.zeros((16, 16, 3), dtype=np.uint8))
    micro_scene(folder / "c.json", [{"boxes": [[2, 2, 6, 6]] * 4}], first_frame="first.png")
    result = bench(f"--checkpoints={tmp_path}", f"--scenes={folder}", "--methods=naive")
    assert result.returncode == 1 and "c.json" in result.stderr and "first_frame" in result.stderr
    assert "Traceback" not in result.stderr


def test_free_objects_are_reported_by_controlled_and_free_counts(tmp_path):
    micro_checkpoints(tmp_path)
    result = bench(f"--checkpoints={tmp_path}", "--methods=naive", "--free=2", f"--json={tmp_path / 'r.json'}")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = json.loads((tmp_path / "r.json").read_text())["methods"]["naive"]
    assert list(saved["by_objects"]) == ["1+2", "2+2", "3+2", "4+2", "5+1", "6+0"]
    result = bench(f"--checkpoints={tmp_path}", "--free=1", "--scenes=scenes/")
    assert result.returncode == 1 and "--free" in result.stderr and "Traceback" not in result.stderr


def test_a_lora_run_is_benched_by_its_path_alone_and_named(tmp_path):
    """The run says which adapter and maps it is: no --adapter=lora; its rows carry the run's name;
    a flag that says otherwise is one line."""
    micro_checkpoints(tmp_path)
    slow = common.load_checkpoint(tmp_path / "slow_generator_micro.pt")
    generator = model_from_checkpoint(slow)
    torch.manual_seed(0)
    lora = build_adapter("lora", generator, "box")
    for p in lora.lora_b:
        torch.nn.init.normal_(p, std=0.05)
    run = tmp_path / "runs" / "my_lora"
    run.mkdir(parents=True)
    adapter_checkpoint(run / "ckpt.pt", lora, generator, "slow-run")
    result = bench(f"--checkpoints={tmp_path}", f"--slow_adapter={run / 'ckpt.pt'}", "--methods=teacher,naive",
                   "--pairs=naive:teacher", f"--json={tmp_path / 'r.json'}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| teacher (my_lora) |" in result.stdout and "| naive (my_lora) − teacher (my_lora) |" in result.stdout
    saved = json.loads((tmp_path / "r.json").read_text())
    assert list(saved["methods"]) == ["teacher (my_lora)", "naive (my_lora)"]
    assert saved["settings"]["adapter"] == "lora" and saved["settings"]["condition"] == "box"
    wrong = bench(f"--checkpoints={tmp_path}", f"--slow_adapter={run / 'ckpt.pt'}", "--adapter=controlnet")
    assert wrong.returncode == 1 and "is a lora adapter's run" in wrong.stderr and "Traceback" not in wrong.stderr
