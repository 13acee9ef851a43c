"""Our training step and scoring against the reference code's own (guojiajeremy/Dinomaly), side by side.

Every measurement runs in a fresh process and the two sides alternate (ours, reference, reference, ours, ...),
with the same torch threads, architecture, batch and random input, and random encoder weights on both sides
(nothing is downloaded). The reference side runs in a Python environment of its own and imports the reference's
modules from a checkout of it; nothing of it is copied here.

    train: forward + loss + backward + clip + optimiser + schedule, as the reference's dinomaly_mvtec_uni.py loop
           (ViTill, global_cosine_hm_percent, StableAdamW, WarmCosineScheduler) vs dinomaly.loop.train_steps,
           ours in fp32 and, with --precisions fp32 bf16, also in train.precision=bf16 (autocast; the reference
           has no mixed precision, so its side is always fp32)
    score: anomaly maps, resize to 256, Gaussian blur and top-1 % image scores, as the reference's
           evaluation_batch (max_ratio 0.01, resize_mask 256) vs dinomaly.inference.Predictor.predict

The reference's `nn.utils.clip_grad_norm` is the deprecated alias of `clip_grad_norm_`; the latter runs here.

    git clone https://github.com/guojiajeremy/Dinomaly /tmp/Dinomaly
    python3.11 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 timm \\
        scikit-learn scikit-image opencv-python-headless matplotlib pandas tabulate colorama
    .venv/bin/python benchmarks/vs_reference.py --reference-repo /tmp/Dinomaly --reference-python /tmp/refvenv/bin/python
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# name: (timm encoder of ours, reference dinov2 arch, embed dim, heads, crop px, batch)
CASES = {
    "vit_s": ("vit_small_patch14_reg4_dinov2", "small", 384, 6, 224, 8),
    "vit_b": ("vit_base_patch14_reg4_dinov2", "base", 768, 12, 224, 8),
}
TARGET_LAYERS = [2, 3, 4, 5, 6, 7, 8, 9]
FUSE = [[0, 1, 2, 3], [4, 5, 6, 7]]


def images(case: str):
    import torch

    *_, size, batch = CASES[case]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))


def ours(case: str, what: str, precision: str = "fp32"):
    """A callable running one training step or one scoring pass of our code."""
    import torch

    from dinomaly.config import Config, DinomalyConfig, EvalConfig, TrainConfig
    from dinomaly.inference import Predictor
    from dinomaly.loop import TrainState, seed_everything, train_steps
    from dinomaly.model.dinomaly import Dinomaly

    encoder, *_, size, batch = CASES[case]
    seed_everything(1)
    model_config = DinomalyConfig(encoder=encoder, encoder_weights="none", image_size=size, crop_size=size)
    model, pixels = Dinomaly(model_config), images(case)
    if what == "score":
        predictor = Predictor(model, EvalConfig(batch_size=batch))
        return lambda: predictor.predict(pixels)
    config = Config(model=model_config, train=TrainConfig(batch_size=batch, global_hard_mining=False,
                                                          precision=precision))
    state = [TrainState.create(model, config)]

    def step():
        _, state[0] = train_steps(model, [pixels], config, state[0], check_finite=False)
    torch.set_grad_enabled(True)
    return step


def reference(case: str, what: str, repo: str):
    """The same, with the reference's modules, built as its dinomaly_mvtec_uni.py builds them."""
    sys.path.insert(0, repo)
    from functools import partial

    import torch
    import torch.nn.functional as F
    from dinov1.utils import trunc_normal_
    from dinov2.models import vision_transformer as dinov2_vit
    from models.uad import ViTill
    from models.vision_transformer import Block, LinearAttention2, bMlp
    from optimizers import StableAdamW
    from torch import nn
    from utils import WarmCosineScheduler, cal_anomaly_maps, get_gaussian_kernel, global_cosine_hm_percent

    _, arch, dim, heads, _, _ = CASES[case]
    torch.manual_seed(1)
    encoder = dinov2_vit.__dict__[f"vit_{arch}"](patch_size=14, img_size=518, block_chunks=0, init_values=1e-8,
                                                 num_register_tokens=4, interpolate_antialias=False,
                                                 interpolate_offset=0.1)
    bottleneck = nn.ModuleList([bMlp(dim, dim * 4, dim, drop=0.2)])
    decoder = nn.ModuleList([Block(dim=dim, num_heads=heads, mlp_ratio=4., qkv_bias=True,
                                   norm_layer=partial(nn.LayerNorm, eps=1e-8), attn=LinearAttention2)
                             for _ in range(8)])
    model = ViTill(encoder=encoder, bottleneck=bottleneck, decoder=decoder, target_layers=TARGET_LAYERS,
                   mask_neighbor_size=0, fuse_layer_encoder=FUSE, fuse_layer_decoder=FUSE)
    trainable = nn.ModuleList([bottleneck, decoder])
    for m in trainable.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)
    pixels = images(case)
    if what == "score":
        blur = get_gaussian_kernel(kernel_size=5, sigma=4)
        model.eval()

        @torch.no_grad()
        def score():
            en, de = model(pixels)
            amap, _ = cal_anomaly_maps(en, de, pixels.shape[-1])
            amap = blur(F.interpolate(amap, size=256, mode="bilinear", align_corners=False))
            flat = amap.flatten(1)
            top = torch.sort(flat, dim=1, descending=True)[0][:, :int(flat.shape[1] * 0.01)]
            return top.mean(dim=1).cpu().numpy(), amap[:, 0].cpu().numpy()
        return score
    optimizer = StableAdamW([{"params": trainable.parameters()}], lr=2e-3, betas=(0.9, 0.999), weight_decay=1e-4,
                            amsgrad=True, eps=1e-10)
    schedule = WarmCosineScheduler(optimizer, base_value=2e-3, final_value=2e-4, total_iters=10000, warmup_iters=100)
    model.train()
    it = [0]

    def step():
        en, de = model(pixels)
        loss = global_cosine_hm_percent(en, de, p=min(0.9 * it[0] / 1000, 0.9), factor=0.1)
        optimizer.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(trainable.parameters(), max_norm=0.1)
        optimizer.step()
        loss.item()
        schedule.step()
        it[0] += 1
    return step


def measure(args) -> None:
    """Worker process: one warm-up call, then `steps` timed calls; prints their seconds as JSON."""
    import torch

    torch.set_num_threads(args.threads)
    run = (reference(args.case, args.what, args.reference_repo) if args.side == "reference"
           else ours(args.case, args.what, args.precision))
    run()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    print(json.dumps({"times": times}))


def spawn(args, side: str, case: str, what: str, precision: str = "fp32") -> float:
    python = args.reference_python if side == "reference" else sys.executable
    command = [python, __file__, "--side", side, "--case", case, "--what", what, "--steps", str(args.steps),
               "--threads", str(args.threads), "--reference-repo", args.reference_repo, "--precision", precision]
    done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if done.returncode:
        raise SystemExit(f"{side} {case} {what} failed:\n{done.stderr[-3000:]}")
    return statistics.median(json.loads(done.stdout.strip().splitlines()[-1])["times"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-repo", required=True, help="a checkout of guojiajeremy/Dinomaly")
    parser.add_argument("--reference-python", default=sys.executable,
                        help="the Python of the reference's environment (default: this one)")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=["vit_s"],
                        help="DINOv2-reg ViT-S/14 or ViT-B/14 encoder, batch 8 at 224 px (default vit_s)")
    parser.add_argument("--what", nargs="+", choices=["train", "score"], default=["train", "score"],
                        help="the training step, scoring, or both (default both)")
    parser.add_argument("--reps", type=int, default=3, help="process pairs per case and measurement")
    parser.add_argument("--steps", type=int, default=5, help="timed calls per process (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, both sides")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                        help="train: our side's train.precision, each against the reference in fp32")
    parser.add_argument("--side", choices=["ours", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        args.what = args.what[0]
        return measure(args)
    print(f"{'case':6} {'what':6} {'ours':5} {'rep':>3} {'ours s':>8} {'ref s':>8} {'ref/ours':>9}   (median of "
          f"{args.steps} calls, {args.threads} threads; the reference in fp32)", flush=True)
    for case in args.cases:
        for what in args.what:
            for precision in args.precisions if what == "train" else ["fp32"]:
                ratios = []
                for rep in range(args.reps):
                    order = ["ours", "reference"] if rep % 2 == 0 else ["reference", "ours"]
                    seconds = {side: spawn(args, side, case, what, precision) for side in order}
                    ratios.append(seconds["reference"] / seconds["ours"])
                    print(f"{case:6} {what:6} {precision:5} {rep + 1:3d} {seconds['ours']:8.3f} "
                          f"{seconds['reference']:8.3f} {ratios[-1]:9.2f}", flush=True)
                print(f"{case:6} {what:6} {precision:5} median ref/ours {statistics.median(ratios):.2f} "
                      "(>1: ours faster)", flush=True)


if __name__ == "__main__":
    main()
