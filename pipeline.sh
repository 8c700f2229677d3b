#!/usr/bin/env bash
# The whole FlashMotion pipeline from nothing, stage by stage:
#
#   bash pipeline.sh tiny     # what checkpoints/ ships: ~15 min on one GPU; on 2 CPU cores
#                             # stage 0 alone takes most of a day (128 clips a step)
#   bash pipeline.sh small    # one GPU
#
# Each script run bare trains the default family's shipped checkpoint
# (--config=small switches to the small recipe); this file passes only what
# differs: the box-map family, the LoRA adapters and the ablations. Each stage
# trains into runs/<name>_<config>/ and, when done, exports its EMA weights to
# checkpoints/<name>_<config>.pt. Run it again after an interruption: finished
# stages are skipped, an unfinished one resumes from its last checkpoint.
# Extra arguments reach every stage (e.g. --num_workers=8).
set -euo pipefail
config=${1:-tiny}
shift || true
extra=("$@")
mkdir -p checkpoints

case $config in
  tiny)  box_steps=4000 joint=(--recipe=dmd_joint) ;;
  small) box_steps=10000 joint=(--recipe=dmd_joint --max_steps=4000) ;;
  *) echo "error: config must be tiny or small, got '$config'" >&2; exit 1 ;;
esac

# stage NAME SCRIPT ARGS...: train (or resume) runs/NAME_CONFIG until done, then export it.
stage() {
  local name=$1 script=$2
  shift 2
  local run=runs/${name}_${config} out=checkpoints/${name}_${config}.pt
  if [ -f "$out" ]; then echo "== $name: $out exists, skipped"; return; fi
  echo "== $name: python $script $*"
  python "$script" --config="$config" --out_dir="$run" --resume=true "$@" "${extra[@]}"
  python -c "import common, sys; common.export_checkpoint(sys.argv[1], sys.argv[2])" "$run/ckpt.pt" "$out"
}

stage video_encoder train_fvd.py          # FlashBench's features
stage autoencoder train_autoencoder.py    # stage 0a: the latent
stage slow_generator train.py
for kind in controlnet lora; do
  # box maps, reading masks for the first 46% of the steps: the paper's 4.6K + 5.4K steps
  stage slow_adapter_$kind train_adapter.py --adapter=$kind --condition=box --init_from=none --mask_first=0.46 \
    --max_steps=$box_steps --lr=5e-4 --warmup=100 --sample_interval=500
  # the mask-map family (the default): the box adapter, continued on mask maps
  stage slow_adapter_${kind}_mask train_adapter.py --adapter=$kind
done
# the paper's lightweight ResNet adapter, on mask maps from scratch (the box adapters' schedule)
stage slow_adapter_resnet_mask train_adapter.py --recipe=resnet --max_steps=$box_steps
stage fast_generator distill.py
for maps in _mask ""; do  # mask maps, then box maps (the paper's final condition)
  stage dmd_joint$maps distill.py "${joint[@]}" \
    --adapter_ckpt=checkpoints/slow_adapter_controlnet${maps}_$config.pt
  kinds=(controlnet lora)
  [ -z "$maps" ] || kinds+=(resnet)  # the ResNet adapter reads mask maps only
  for kind in "${kinds[@]}"; do
    for loss in hybrid fixed_lambda diffusion adversarial; do
      stage fast_adapter_${loss}_$kind$maps hybrid_finetune.py --loss=$loss \
        --adapter_ckpt=checkpoints/slow_adapter_$kind${maps}_$config.pt
    done
  done
done
# the ResNet family's dmd-joint (the ablation table's "DMD on the controlled model")
stage dmd_joint_resnet_mask distill.py "${joint[@]}" --adapter_ckpt=checkpoints/slow_adapter_resnet_mask_$config.pt
# the paper's LCM baseline: the default family's slow pair, by consistency distillation
stage lcm_joint_mask consistency.py
python bench.py --config="$config" --json="runs/bench_$config.json" --gif="runs/bench_$config.gif"
python bench.py --config="$config" --condition=box --json="runs/bench_box_$config.json"
