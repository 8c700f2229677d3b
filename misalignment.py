"""The misalignment of each adapter family, measured before stage 3 (research, not shipped).

    python misalignment.py controlnet lora resnet   # writes runs/misalignment_<kind>.json

For each family, on FlashBench's scenes and noise (bench.measure, both seeds):
the teacher (slow pair, 50 steps, CFG 3), and the naive pairing with the fast
generator's weights scaled back towards the slow generator's,
slow + a (fast - slow), a in 0, 0.5, 1, all through the fast generator's
4-step sampler (a = 0: the slow pair through that sampler; a = 1: naive).
Paired differences: naive(a) - naive(0), the part of the misalignment the
weight change causes, and naive(a) - teacher."""
import copy
import json
import sys

import bench
import common
import fvd
from sample import load_method

SCALES = (0.0, 0.5, 1.0)


def scaled_naive(naive, slow, fast, scale):
    """The naive pair with its generator's weights at slow + scale (fast - slow)."""
    method = copy.copy(naive)
    method.model = copy.deepcopy(naive.model)
    method.model.generator.load_state_dict({name: slow[name] + scale * (weight - slow[name])
                                            for name, weight in fast.items()})
    return method


def main(kinds):
    common.set_threads(0)
    opt = type("Opt", (), {"guidance": 3.0, "seed": 0})  # bench's defaults
    scenes = bench.benchmark_scenes("tiny", 8)
    encoder, *references = fvd.load_encoder("checkpoints/video_encoder_tiny.pt")
    slow = {k: v.float() for k, v in common.load_checkpoint("checkpoints/slow_generator_tiny.pt")["ema"].items()}
    fast = {k: v.float() for k, v in common.load_checkpoint("checkpoints/fast_generator_tiny.pt")["ema"].items()}
    for kind in kinds:
        naive = load_method("naive", "tiny", kind)
        methods = {"teacher": load_method("teacher", "tiny", kind)}
        methods |= {f"naive a={a}": scaled_naive(naive, slow, fast, a) for a in SCALES}
        rows, per_scene = {}, {}
        for name, method in methods.items():
            rows[name], _, per_scene[name] = bench.measure(method, scenes, encoder, references, opt)
            print(kind, name, {k: round(rows[name][k], 4) for k in ("fid", "fvd", "miou", "box_iou")}, flush=True)
        pairs = [(f"naive a={a}", "naive a=0.0") for a in SCALES[1:]] + [(f"naive a={a}", "teacher") for a in SCALES]
        differences = bench.paired_differences(pairs, per_scene, references)
        for pair, row in differences.items():
            print(kind, pair, {k: row[k] for k in ("miou", "miou_ci", "box_iou", "box_iou_ci", "fid", "fid_ci")},
                  flush=True)
        with open(f"runs/misalignment_{kind}.json", "w") as f:
            json.dump({"rows": rows, "pairs": differences}, f, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1:])
