"""Memory of one training worker: parameter counts for ViT-S/B/L and the peak RSS of one CPU training step.

Each measured case runs in a fresh process: build the model (random encoder weights, nothing downloaded),
note the RSS, run one optimiser step (forward, loss, backward, clip, StableAdamW; the first step also
allocates the optimiser state), and report the peak RSS (ru_maxrss) minus the RSS before the step.
cluster/README.md "Sizing" scales these to other sizes, batches and to GPUs.

    .venv/bin/python benchmarks/train_memory.py [--measure vit_s] [--crop 392] [--batch 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

ENCODERS = {"vit_s": "vit_small_patch14_reg4_dinov2", "vit_b": "vit_base_patch14_reg4_dinov2",
            "vit_l": "vit_large_patch14_reg4_dinov2"}
TARGET_LAYERS = {"vit_s": [2, 3, 4, 5, 6, 7, 8, 9], "vit_b": [2, 3, 4, 5, 6, 7, 8, 9],
                 "vit_l": [4, 6, 8, 10, 12, 14, 16, 18]}

CHILD = """
import json, resource, sys, time, torch
torch.set_num_threads(1)
from dinomaly.config import Config, DinomalyConfig, TrainConfig
from dinomaly.loop import train_steps
from dinomaly.model.dinomaly import Dinomaly

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

encoder, layers, crop, batch, step = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"
model_config = DinomalyConfig(encoder=encoder, encoder_weights="none", target_layers=layers,
                              image_size=crop * 8 // 7, crop_size=crop)
model = Dinomaly(model_config)
trainable = sum(p.numel() for p in model.trainable_parameters())
encoder_params = sum(p.numel() for p in model.encoder.parameters())
out = dict(trainable_params=trainable, encoder_params=encoder_params, width=model.encoder.embed_dim)
if step:
    config = Config(model=model_config, train=TrainConfig(total_steps=10, warmup_steps=1, batch_size=batch))
    images = torch.randn(batch, 3, crop, crop)
    before = rss_mib()
    start = time.perf_counter()
    train_steps(model, [images], config)
    out.update(rss_before_step_mib=before, step_s=time.perf_counter() - start,
               peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
print(json.dumps(out))
"""


def run(case: str, crop: int, batch: int, step: bool) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, ENCODERS[case], json.dumps(TARGET_LAYERS[case]),
                             str(crop), str(batch), "1" if step else "0"], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", nargs="*", default=["vit_s"], help="cases whose training step is measured")
    parser.add_argument("--crop", type=int, default=392)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    print(f"{'case':<6} {'width':>5} {'trainable':>10} {'encoder':>9} {'RSS before':>10} {'step peak':>9} "
          f"{'step delta':>10} {'step s':>7}   ({args.crop} px, batch {args.batch}, fp32, CPU)")
    for case in ENCODERS:
        r = run(case, args.crop, args.batch, case in args.measure)
        measured = "rss_before_step_mib" in r
        cells = (f"{r['rss_before_step_mib']:>9.0f}M {r['peak_rss_mib']:>8.0f}M "
                 f"{r['peak_rss_mib'] - r['rss_before_step_mib']:>9.0f}M {r['step_s']:>7.1f}") if measured else \
            f"{'-':>10} {'-':>9} {'-':>10} {'-':>7}"
        print(f"{case:<6} {r['width']:>5} {r['trainable_params'] / 1e6:>9.1f}M {r['encoder_params'] / 1e6:>8.1f}M {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
