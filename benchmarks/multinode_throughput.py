"""Training throughput across the node boundary: 2 DDP workers on two Ray nodes vs 2 workers on one node.

Both cases are real `ray job submit` runs of pipelines/train.py on cluster/local/multinode.sh clusters
(data and checkpoints in the moto S3 bucket, metrics in the MLflow server): "two nodes" = head + one
worker node with 1 CPU each (separate network namespaces joined by veth; needs root), "one
node" = a head with 2 CPUs. The figure is the median of rank 0's images/s over the logged chunks after
the first (MLflow metric images_per_s), plus the job's wall time. Then the scaling estimate for
ViT-B@392 on 8 GPU nodes (cluster/README.md) from the gradient size and stated assumptions.

    .venv/bin/python benchmarks/multinode_throughput.py [--steps 60] [--batch-size 4] [--image-size 56]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from multinode_cluster import TINY_TRAIN_SETTINGS, LocalCluster  # noqa: E402

VIT_B_TRAINABLE_PARAMS = 61.4e6  # bottleneck + 8 decoder blocks at width 768


def run_case(label: str, workers: int, cpus_per_node: int, args: argparse.Namespace, data: Path) -> dict:
    cluster = LocalCluster(workers=workers, cpus_per_node=cpus_per_node)
    try:
        cluster.up()
        data_uri = cluster.upload(data, "data/demo")
        settings = [*TINY_TRAIN_SETTINGS, f"model.image_size={args.image_size}", f"model.crop_size={args.image_size}",
                    f"train.log_every={args.log_every}", f"train.checkpoint_every={args.steps}"]
        command = ["python", "pipelines/train.py", "--config", "demo", "--data", data_uri, "--workers", "2",
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--name", label,
                   "--storage-path", f"s3://{cluster.settings['BUCKET']}/checkpoints",
                   "--output", str(cluster.state_dir / "out"), *[a for s in settings for a in ("--set", s)]]
        started = time.monotonic()
        cluster.submit(label, command)
        status = cluster.wait_job(label, timeout_s=1800)
        wall_s = time.monotonic() - started
        if status != "SUCCEEDED":
            raise RuntimeError(f"{label}: job {status}\n{cluster.job_logs(label)[-3000:]}")
        nodes = sorted({w["node"] for w in cluster.train_workers(label)})
        history = cluster.python_json("""
            import json, os, sys
            from mlflow import MlflowClient
            client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
            experiment = client.get_experiment_by_name("dinomaly-demo")
            run = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{sys.argv[1]}'")[0]
            points = client.get_metric_history(run.info.run_id, "images_per_s")
            print(json.dumps([p.value for p in sorted(points, key=lambda p: p.step)]))
        """, label)
        steady = history[1:] or history
        return dict(case=label, nodes=nodes, images_per_s=statistics.median(steady), chunks=len(history),
                    wall_s=wall_s)
    finally:
        cluster.down()


def allreduce_s(params: float, nodes: int, gbit_per_s: float, bytes_per_value: int = 4) -> float:
    """Ring all-reduce time of the gradients: each node sends and receives 2 (N-1)/N of the buffer."""
    return 2 * (nodes - 1) / nodes * params * bytes_per_value / (gbit_per_s * 1e9 / 8)


def print_scaling_estimate(compute_ms_per_image: float = 35.0, nodes: int = 8) -> None:
    """Scaling efficiency = compute / (compute + all-reduce), assuming no overlap (a lower bound)."""
    print(f"\nViT-B@392 on {nodes} single-GPU nodes, {VIT_B_TRAINABLE_PARAMS / 1e6:.1f}M trainable parameters, "
          f"{compute_ms_per_image:.0f} ms of compute per image per GPU (assumed), no comm/compute overlap:")
    print(f"{'images/GPU':>10} {'link':>9} {'gradient':>9} {'all-reduce':>11} {'compute':>8} {'efficiency':>10}")
    for per_gpu in (2, 8, 16):
        compute_s = per_gpu * compute_ms_per_image / 1000
        for gbit, dtype_bytes, name in ((10, 4, "fp32"), (25, 4, "fp32"), (100, 4, "fp32"), (25, 2, "bf16")):
            comm = allreduce_s(VIT_B_TRAINABLE_PARAMS, nodes, gbit, dtype_bytes)
            print(f"{per_gpu:>10} {gbit:>6}Gb/s {name:>9} {comm * 1000:>9.0f}ms {compute_s * 1000:>6.0f}ms "
                  f"{compute_s / (compute_s + comm):>10.0%}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=56)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--estimate-only", action="store_true", help="print the 8-node estimate and exit")
    args = parser.parse_args()
    if not args.estimate_only:
        from dinomaly.data.demo import generate_demo_dataset

        data = generate_demo_dataset(Path(tempfile.mkdtemp(prefix="dnm-bench-")) / "demo", classes=["nut"],
                                     train_per_class=16, test_good_per_class=2, test_defect_per_class=2, size=64)
        results = [run_case("two-nodes", 1, 1, args, data), run_case("one-node", 0, 2, args, data)]
        print(f"\n{'case':<10} {'worker nodes':<14} {'images/s':>9} {'chunks':>7} {'job wall':>9}")
        for r in results:
            print(f"{r['case']:<10} {'+'.join(r['nodes']):<14} {r['images_per_s']:>9.1f} {r['chunks']:>7} "
                  f"{r['wall_s']:>8.0f}s")
        cross = results[0]["images_per_s"] / results[1]["images_per_s"]
        print(f"two nodes / one node throughput: {cross:.2f}")
    print_scaling_estimate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
