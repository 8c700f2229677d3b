import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import common

MICRO = ["--config=micro", "--batch_size=2", "--num_workers=0", "--sample_interval=0", "--ckpt_interval=2"]


def train(*args, env=None):
    return subprocess.run([sys.executable, "train.py", *MICRO, *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert train("--max_steps=6", f"--out_dir={straight}").returncode == 0
    first = train("--max_steps=6", "--stop_at=3", f"--out_dir={interrupted}")
    assert first.returncode == 0 and common.load_checkpoint(interrupted / "ckpt.pt")["step"] == 3
    assert train("--max_steps=6", "--resume=true", f"--out_dir={interrupted}").returncode == 0
    a, b = common.load_checkpoint(straight / "ckpt.pt"), common.load_checkpoint(interrupted / "ckpt.pt")
    assert a["step"] == b["step"] == 6 and a["run_id"] != b["run_id"]
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    assert len((interrupted / "log.jsonl").read_text().splitlines()) == 6
    assert (straight / "curves.png").exists() and (interrupted / "curves.png").exists()  # plot.write_curves


def test_existing_run_is_not_overwritten_without_resume(tmp_path):
    assert train("--max_steps=2", f"--out_dir={tmp_path}").returncode == 0
    before = (tmp_path / "ckpt.pt").read_bytes()
    result = train("--max_steps=4", f"--out_dir={tmp_path}")
    assert result.returncode == 1 and "--resume=true" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("flag, message", [("--lr=fast", "--lr must be a number"),
                                           ("--batchsize=4", "unknown option --batchsize"),
                                           ("--config=huge", "--config must be one of"),
                                           ("--resume=maybe", "--resume must be true or false"),
                                           ("--config=tiny --autoencoder=none/autoencoder_tiny.pt",
                                            "autoencoder_tiny.pt; make it with python train_autoencoder.py")])
def test_bad_flags_fail_with_one_line(flag, message, tmp_path):
    result = train(*flag.split(), f"--out_dir={tmp_path}")
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "ckpt.pt").exists()


def test_two_process_ddp_step_keeps_ranks_in_sync(tmp_path):
    # train.py checks the ranks' weight checksums at every checkpoint and fails
    # loudly if they differ (see the next test for that check failing).
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2", "train.py", *MICRO, "--max_steps=2",
                             f"--out_dir={tmp_path}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 rank(s)" in result.stdout
    ckpt = common.load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 2 and ckpt["train_config"]["batch_size"] == 2


def _sync_worker(rank, port, diverge, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)  # same initial weights on both ranks
    model = torch.nn.Linear(3, 3)
    torch.nn.init.constant_(model.weight, 1.0 + (rank if diverge else 0))
    try:
        common.check_ranks_in_sync(model)
        results[rank] = "in sync"
    except RuntimeError as e:
        results[rank] = str(e)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("diverge", [False, True])
def test_rank_sync_check_catches_divergence(diverge):
    results = mp.Manager().dict()
    mp.spawn(_sync_worker, args=(free_port(), diverge, results), nprocs=2)
    expected = "DDP ranks diverged" if diverge else "in sync"
    assert all(expected in results[r] for r in range(2))


def test_checkpoint_write_is_atomic(tmp_path):
    path = tmp_path / "ckpt.pt"
    common.save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    with pytest.raises(Exception):
        common.save_checkpoint(path, {"step": 2, "bad": lambda: None})  # fails while pickling
    assert common.load_checkpoint(path)["step"] == 1
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temp file left behind


def test_checkpoint_kind_is_checked(tmp_path):
    common.save_checkpoint(tmp_path / "a.pt", {"kind": "slow_adapter"})
    with pytest.raises(common.UserError, match="expected 'slow_generator'"):
        common.load_checkpoint(tmp_path / "a.pt", kind="slow_generator")
    with pytest.raises(common.UserError, match="not found"):
        common.load_checkpoint(tmp_path / "missing.pt")


def test_learning_rate_schedule():
    lrs = [common.lr_at(s, 1.0, warmup=10, max_steps=100) for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and abs(lrs[-1] - 0.1) < 1e-3
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_time_limit_stops_with_a_checkpoint_to_resume(tmp_path):
    result = subprocess.run([sys.executable, "train.py", "--config=micro", "--batch_size=2",
                             "--num_workers=0", "--sample_interval=0", "--ckpt_interval=100000",
                             "--max_steps=100000", "--stop_at=0", "--time_limit=0.02", f"--out_dir={tmp_path}"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    step = common.load_checkpoint(tmp_path / "ckpt.pt")["step"]
    assert 0 < step < 100000 and f"stopped: {tmp_path}/ckpt.pt at step {step}/100000" in result.stdout


def test_export_never_replaces_an_existing_file(tmp_path):
    common.save_checkpoint(tmp_path / "run.pt", {"kind": "slow_generator", "ema": {"w": torch.ones(2)},
                                                 "optimizer": {}})
    (tmp_path / "shipped.pt").write_bytes(b"what ships")
    with pytest.raises(common.UserError, match="exists: not replaced"):
        common.export_checkpoint(tmp_path / "run.pt", tmp_path / "shipped.pt")
    assert (tmp_path / "shipped.pt").read_bytes() == b"what ships"
    common.export_checkpoint(tmp_path / "run.pt", tmp_path / "new.pt")
    assert "optimizer" not in common.load_checkpoint(tmp_path / "new.pt")


def test_no_script_writes_into_checkpoints_unless_a_flag_names_the_path():
    import bench, distill, hybrid_finetune, sample, train_adapter, train_autoencoder, train_fvd
    import train as train_script
    for script in (train_script, train_adapter, distill, hybrid_finetune, train_fvd, train_autoencoder, sample, bench):
        for name, (default, _) in script.FLAGS.items():
            if name in ("out_dir", "export", "out", "json", "gif"):
                assert not str(default).startswith("checkpoints"), (script.__name__, name, default)


def test_a_bare_boolean_flag_means_true():
    flags = {"resume": (False, ""), "compile": (True, ""), "max_steps": (3, ""), "name": ("", "")}
    parse = lambda *argv: vars(common.parse_flags(flags, list(argv), "doc"))
    assert parse("--resume") == {"resume": True, "compile": True, "max_steps": 3, "name": ""}
    assert parse("--resume", "--max_steps", "5")["resume"] and parse("--resume", "--max_steps", "5")["max_steps"] == 5
    assert parse("--compile", "false")["compile"] is False and parse("--resume", "1")["resume"] is True
    assert parse("--name", "x", "--resume")["resume"] is True
    with pytest.raises(common.UserError, match="expected --key=value or --key value, got .--max_steps."):
        parse("--max_steps")


def test_threads_sets_the_process_threads_and_zero_leaves_the_default(tmp_path):
    from types import SimpleNamespace
    before = torch.get_num_threads()
    opt = lambda threads: SimpleNamespace(out_dir=str(tmp_path), resume=False, seed=0, stop_at=0, max_steps=1,
                                          threads=threads)
    try:
        common.Run(opt(0), kind="slow_generator")
        assert torch.get_num_threads() == before
        common.Run(opt(1), kind="slow_generator")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
