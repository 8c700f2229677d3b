#!/usr/bin/env bash
# The whole FlashMotion pipeline from nothing, stage by stage:
#
#   bash pipeline.sh tiny     # what checkpoints/ ships: ~15 min on one GPU; on 2 CPU cores
#                             # stage 0 alone takes most of a day (128 clips a step)
#   bash pipeline.sh small    # one GPU
#
# Each stage trains into runs/<name>_<config>/ and, when done, exports its EMA
# weights to checkpoints/<name>_<config>.pt. Run it again after an
# interruption: finished stages are skipped, an unfinished one resumes from
# its last checkpoint. Extra arguments reach every stage (e.g. --num_workers=8).
set -euo pipefail
config=${1:-tiny}
shift || true
extra=("$@")
mkdir -p checkpoints

case $config in
  tiny)  steps_fvd=1500 steps_ae=6000 steps0=4800 stop0=3977 batch0=128 steps1=4000 steps1m=600 batch1=32 steps2=4000 stop2=1000 steps2j=1200 steps3=500 ;;
  small) steps_fvd=4000 steps_ae=12000 steps0=40000 stop0=0 batch0=64 steps1=10000 steps1m=1500 batch1=32 steps2=4000 stop2=0 steps2j=4000 steps3=1000 ;;
  *) echo "error: config must be tiny or small, got '$config'" >&2; exit 1 ;;
esac

# stage NAME RUN_DIR STEPS SCRIPT ARGS...: train (or resume) until done, then export.
stage() {
  local name=$1 run=$2 steps=$3 script=$4
  shift 4
  local out=checkpoints/${name}_${config}.pt
  if [ -f "$out" ]; then echo "== $name: $out exists, skipped"; return; fi
  echo "== $name: python $script $*"
  python "$script" --config="$config" --out_dir="$run" --max_steps="$steps" --resume=true "$@" "${extra[@]}"
  python -c "import common, sys; common.export_checkpoint(sys.argv[1], sys.argv[2])" "$run/ckpt.pt" "$out"
}

stage video_encoder runs/video_encoder_$config $steps_fvd fvd.py --export=none  # FlashBench's features
stage autoencoder runs/autoencoder_$config $steps_ae autoencoder.py --export=none  # stage 0a: the latent
# tiny's shipped run stopped at its time limit (4 minutes of one H100) at step 3977
stage slow_generator runs/slow_generator_$config $steps0 train.py --batch_size=$batch0 --lr=8e-4 --stop_at=$stop0
for kind in controlnet lora; do
  # masks for 46% of the steps, then boxes: the paper's 4.6K + 5.4K steps
  stage slow_adapter_$kind runs/slow_adapter_${kind}_$config $steps1 train_adapter.py --adapter=$kind \
    --batch_size=$batch1 --mask_first=0.46
  # the mask-map family (the default of sample.py and bench.py): the box adapter, continued on mask maps
  stage slow_adapter_${kind}_mask runs/slow_adapter_${kind}_mask_$config $steps1m train_adapter.py --adapter=$kind \
    --condition=mask --init_from=checkpoints/slow_adapter_${kind}_$config.pt --batch_size=$batch1 --lr=2e-4 --warmup=50
done
# the paper's ~4K-iteration schedule; tiny stops after 1000, where its fast generator
# equals the slow one (more DMD makes it rougher: docs/results.md, stage 2)
stage fast_generator runs/fast_generator_$config $steps2 distill.py --ratio=5 --lr_generator=5e-5 --stop_at=$stop2
for maps in _mask ""; do  # mask maps, then box maps (the paper's final condition)
  stage dmd_joint$maps runs/dmd_joint${maps}_$config $steps2j distill.py --controlled=true --ratio=5 \
    --lr_generator=5e-5 --adapter_ckpt=checkpoints/slow_adapter_controlnet${maps}_$config.pt
  for kind in controlnet lora; do
    for loss in hybrid fixed_lambda diffusion adversarial; do
      stage fast_adapter_${loss}_$kind$maps runs/fast_adapter_${loss}_$kind${maps}_$config $steps3 hybrid_finetune.py \
        --loss=$loss --adapter_ckpt=checkpoints/slow_adapter_$kind${maps}_$config.pt
    done
  done
done
python bench.py --config="$config" --json="runs/bench_$config.json" --gif="runs/bench_$config.gif"
python bench.py --config="$config" --condition=box --json="runs/bench_box_$config.json"
