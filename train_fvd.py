"""Train FlashBench's feature network (fvd.py), and store the real clips'
statistics that FID and FVD compare with.

The network learns dense tasks that make it see what a person sees in
these clips: per pixel of every frame, which of the 8 object colours and
which of the 5 shapes covers it, or the background; per object pixel, how
far its object moved since the last frame. Training clips come from their
own seed; bench.py's held-out scenes use data.HELD_OUT_SEED.

    python train_fvd.py                          # the tiny network (CPU, ~20 minutes)
    python train_fvd.py --config=small
    python train_fvd.py --resume=true --export=checkpoints/video_encoder_tiny.pt
"""

import sys

import torch
import torch.nn.functional as F

import data
from common import Run, check_new_file, export_checkpoint, lr_at, parse_flags, require_at_least, require_one_of, set_lr
from fvd import N_COLORS, N_SHAPES, VideoEncoder, reference_statistics
from model import CLIP_SHAPES


class LabelledWorld(data.SpriteWorld):
    """The sprite world with what the network learns to say about each object:
    its shape (index into data.RANDOM_SHAPES; -1 for an empty slot) and exact centre
    per frame."""

    def sample(self, rng):
        scene = data.random_scene(rng, self.frames, self.size, self.n_objects)
        shapes = torch.full((data.MAX_OBJECTS,), -1)
        centers = torch.zeros(data.MAX_OBJECTS, self.frames, 2)
        for k, obj in enumerate(scene.objects):
            shapes[k] = data.RANDOM_SHAPES.index(obj.shape)
            centers[k] = torch.from_numpy(obj.centers).float()
        return {**data.to_sample(data.render(scene), self.size), "shapes": shapes, "centers": centers}


def targets(batch, size):
    """A LabelledWorld batch as the heads' targets: each pixel's colour class
    (0 background, 1 + palette index) and shape class (0 background, 1 + index
    into data.RANDOM_SHAPES), (B, T, H, W) each; and the step of its object's centre
    since the last frame in pixels (B, T, 2, H, W; zero off objects and in
    frame 0)."""
    B, K, T = batch["boxes"].shape[:3]
    device = batch["boxes"].device
    colour_class = torch.zeros(B, T, size, size, dtype=torch.long, device=device)
    shape_class = torch.zeros_like(colour_class)
    flow = torch.zeros(B, T, 2, size, size, device=device)
    palette = torch.from_numpy(data.OBJECT_COLORS).long().to(device)
    for b in range(B):
        for k in range(int(batch["n_objects"][b])):
            slot = int((batch["colors"][b, k].long() == palette).all(-1).nonzero()[0])
            mask = batch["masks"][b, k].to(device)  # (T, H, W)
            colour_class[b][mask] = 1 + slot
            shape_class[b][mask] = 1 + int(batch["shapes"][b, k])
            centres = batch["centers"][b, k].to(device)  # (T, 2)
            step = torch.cat([torch.zeros(1, 2, device=device), centres[1:] - centres[:-1]])  # (T, 2)
            flow[b] = torch.where(mask[:, None], step[:, :, None, None], flow[b])
    return colour_class, shape_class, flow


# Objects cover a few percent of the pixels: weighting them keeps the pixel
# heads from settling on "all background".
OBJECT_PIXEL_WEIGHT = 5.0


def encoder_loss(encoder, batch, size):
    """Pixel cross-entropies (colour and shape) and the squared error of the
    object pixels' motion: (total, pixel loss, motion error in pixels)."""
    colour_class, shape_class, flow = targets(batch, size)
    pixels, predicted_flow = encoder(batch["video"])
    pixels = pixels.flatten(0, 1)  # (B*T, PIXEL_CLASSES, H, W)
    weight = lambda n: torch.tensor([1.0] + [OBJECT_PIXEL_WEIGHT] * n, device=pixels.device)
    pixel_loss = (F.cross_entropy(pixels[:, :1 + N_COLORS], colour_class.flatten(0, 1), weight=weight(N_COLORS))
                  + F.cross_entropy(pixels[:, 1 + N_COLORS:], shape_class.flatten(0, 1), weight=weight(N_SHAPES)))
    on_object = (colour_class[:, 1:] > 0)[:, :, None].expand_as(flow[:, 1:])  # frames 1..: frame 0 has no step
    motion_error = (predicted_flow[:, 1:] - flow[:, 1:])[on_object]
    motion_loss = (motion_error ** 2).mean()
    return pixel_loss + motion_loss, pixel_loss, motion_loss.sqrt()


FLAGS = dict(
    config=("tiny", "micro | tiny | small: the clips' shape"),
    out_dir=("", "default runs/video_encoder_<config>"),
    export=("", "when done, copy the weights (no optimizer) to this file, never over an existing one; empty: do not"),
    width=(32, "channels of the first conv; FID compares 6 x width features, FVD 2 x width"),
    batch_size=(16, "clips per step"),
    max_steps=(1500, "training steps"),
    stop_at=(0, "stop (with a checkpoint) after this step, to resume later; 0: run to max_steps"),
    lr=(2e-3, "peak learning rate"),
    warmup=(50, "linear warmup steps"),
    ckpt_interval=(250, "checkpoint every this many steps"),
    reference_clips=(2048, "real clips behind the stored reference statistics"),
    num_workers=(1, "data processes rendering clips"),
    seed=(0, "seed of weights and data"),
    threads=(0, "CPU threads of this process; 0: every core (PyTorch's default)"),
    compile=(False, "torch.compile the encoder"),
    resume=(False, "continue the run in out_dir"),
)

RECIPES = {"small": dict(max_steps=4000)}  # --config=small


def main(argv):
    opt = parse_flags(FLAGS, argv, __doc__, RECIPES)
    require_one_of(opt, "config", CLIP_SHAPES)
    require_at_least(opt, ("batch_size", "max_steps", "ckpt_interval"))
    require_at_least(opt, ("width",), 8)  # GroupNorm(8)
    require_at_least(opt, ("reference_clips",), 2)  # a covariance needs two clips
    shape = data.video_shape(opt.config)
    opt.out_dir = opt.out_dir or f"runs/video_encoder_{opt.config}"
    if opt.export:
        check_new_file(opt.export)  # refused now, not after the training
    run = Run(opt, kind="video_encoder")

    encoder = VideoEncoder(**shape, width=opt.width).to(run.device)
    optimizer = torch.optim.AdamW(encoder.parameters(), lr=opt.lr, weight_decay=0.01)
    run.restore(encoder=encoder, optimizer=optimizer)
    print(f"FlashBench feature network: {sum(p.numel() for p in encoder.parameters()) / 1e6:.2f}M parameters, "
          f"{opt.config} clips {shape}, step {run.step}/{opt.max_steps}")
    train_encoder = run.wrap(encoder)

    def save(**extra):
        run.save(encoder, config=encoder.config(), encoder=encoder.state_dict(), optimizer=optimizer.state_dict(),
                 **extra)

    batches = run.batches(LabelledWorld(**shape, batch_size=opt.batch_size, seed=opt.seed + 11, start=run.step))
    for step in run.steps("feature network"):
        encoder.train()
        set_lr(optimizer, lr_at(step, opt.lr, opt.warmup, opt.max_steps))
        batch = {key: value.to(run.device) for key, value in next(batches).items()}
        loss, pixel_loss, motion_px = encoder_loss(train_encoder, batch, shape["size"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.log({"loss": round(loss.item(), 5), "pixel": round(pixel_loss.item(), 5),
                 "motion_px": round(motion_px.item(), 3)}, clips=opt.batch_size)
        if run.due(opt.ckpt_interval):
            save()
            run.draw_curves()
    if run.step < opt.max_steps:  # stopped early: resume later
        return
    # Real statistics from a seed neither training nor the benchmark uses.
    frame_reference, clip_reference = reference_statistics(encoder, opt.config, opt.reference_clips,
                                                           seed=opt.seed + 29)
    save(frame_reference=frame_reference, clip_reference=clip_reference, reference_clips=opt.reference_clips,
         shapes=list(data.RANDOM_SHAPES))  # the shapes its heads tell apart, checked where it is loaded
    if opt.export:
        export_checkpoint(run.path, opt.export)
        print(f"exported to {opt.export}")


if __name__ == "__main__":
    main(sys.argv[1:])
