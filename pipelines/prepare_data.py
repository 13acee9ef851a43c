"""Build a Parquet manifest (one row per image) from a dataset folder or bucket and print its counts.

    python pipelines/prepare_data.py --data /data/mvtec --output manifests/mvtec.parquet
    python pipelines/prepare_data.py --layout realiad --data s3://bucket/Real-IAD --output s3://bucket/realiad.parquet
    python pipelines/prepare_data.py --data ./mvtec --upload-to s3://bucket/mvtec --output s3://bucket/mvtec.parquet
    python pipelines/prepare_data.py --data s3://bucket/realiad.parquet --pack --output s3://bucket/realiad-packed
    python pipelines/prepare_data.py --data /data/mvtec --verify
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dinomaly.config import apply_overrides, load_config
from dinomaly.config.cli import entry_parser, refuse_both, start_logging
from dinomaly.data.layouts import LAYOUTS
from dinomaly.data.manifest import format_counts, load_manifest, read_manifest, write_manifest
from dinomaly.data.pack import DEFAULT_SHARD_BYTES, MAX_LISTED, pack_manifest, packed_layout, verify_manifest
from dinomaly.data.storage import upload_tree

SHOWN_BAD = 20  # bad rows printed; the rest are counted


def build_parser() -> argparse.ArgumentParser:
    parser = entry_parser(__doc__, flags=("config", "data", "output", "set"), required=("data",),
                          deprecated={"--root": "data", "--out": "output"}, keys=False,
                          set_example="--set data.realiad_json_variant=realiad_jsons_sv",
                          help={"config": "YAML preset name or path whose data section is the base",
                                "data": "the data set to index: a dataset layout root (folder or s3:// prefix), "
                                        "or a manifest (.parquet) to --pack or --verify",
                                "output": "the manifest to write (.parquet, local path or s3:// URI); with --pack "
                                          "a folder/prefix or .parquet, shards beside it"})
    parser.epilog = ("Layouts: mvtec/mpdd/visa = <cls>/train/good, test/<defect>, ground_truth/<defect>; visa_raw = "
                     "<cls>/Data/Images + split_csv/1cls.csv; realiad = realiad_1024/ + realiad_jsons/<variant>/; "
                     "folder = <cls>/good, [<cls>/defect/<type>], [<cls>/masks/<type>]. Other data.* keys "
                     "(realiad_json_variant, visa_split_csv, folder_test_fraction) go through --set.")
    parser.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS], help="dataset layout (default: auto)")
    parser.add_argument("--categories", default="", help="comma-separated classes to keep (default: all)")
    parser.add_argument("--upload-to", default="", metavar="URI",
                        help="first copy the local --data to this bucket prefix, then index the copy")
    parser.add_argument("--pack", action="store_true",
                        help="write the images (original bytes) and masks into Parquet shards with the manifest "
                             "columns, verifying each one (bad rows are listed and left out; data.strict=true "
                             "fails on the first); rerun to continue an interrupted pack")
    parser.add_argument("--shard-mb", type=int, default=None,
                        help=f"shard size in MB for --pack (default: {DEFAULT_SHARD_BYTES // 2**20})")
    parser.add_argument("--verify", action="store_true",
                        help="only check that every image decodes and every mask has its image's size (a packed "
                             "manifest: the bytes in its shards); exit 2 listing the bad rows")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_logging()
    from dinomaly.distributed.cluster import check_job_storage
    from dinomaly.distributed.entry import run_job

    def check():
        if args.verify and args.pack:
            raise ValueError("--verify and --pack do not combine: --pack checks every row as it packs; drop --verify")
        if not args.output and not args.verify:
            raise ValueError("--output is required (except with --verify)")
        if args.output and args.verify:
            raise ValueError("--verify writes nothing, so --output would be ignored: drop --output, or drop "
                             "--verify to write the manifest")
        if args.shard_mb is not None and not args.pack:
            raise ValueError("--shard-mb sizes the shards of --pack: add --pack, or drop --shard-mb")
        if args.shard_mb is None:
            args.shard_mb = DEFAULT_SHARD_BYTES // 2**20
        if args.shard_mb < 1:
            raise ValueError(f"--shard-mb {args.shard_mb} must be a positive number of MB "
                             f"(default {DEFAULT_SHARD_BYTES // 2**20})")
        if args.output:
            check_job_storage({"--output": args.output})
        categories = [c.strip() for c in args.categories.split(",") if c.strip()]
        refuse_both(args.set, {flag: key for flag, key, given in (
            ("categories", "data.categories", categories), ("layout", "data.layout", args.layout != "auto"),
            ("upload_to", "data.root", args.upload_to), ("data", "data.root", True)) if given})
        config = apply_overrides(load_config(args.config, args.set), {
            "data.root": args.upload_to or args.data, "data.layout": args.layout, "data.categories": categories})
        if args.output:
            check_manifest_output(args.output, args.pack, config.data)
        return config

    def run(config) -> int:  # a bad layout or a missing mask: one line, exit 2 (run_job)
        if args.upload_to:
            upload_tree(args.data, args.upload_to, config.data)
        table = load_manifest(config.data)
        if args.verify:
            bad = verify_manifest(table, config.data, strict=config.data.strict)
            print_bad("bad", bad, len(bad))
            print(f"verified {table.num_rows} images: {len(bad)} bad")
            return 2 if bad else 0
        if args.pack:
            uri = pack_manifest(table, args.output, args.shard_mb * 2**20, config.data, strict=config.data.strict)
            table = read_manifest(uri, data_config=config.data)
            layout = packed_layout(table)
            listed = "all" if layout["bad_count"] <= MAX_LISTED else f"the first {MAX_LISTED}"
            print_bad("bad (not packed)", layout["bad_files"], layout["bad_count"],
                      f"; {listed} under bad_files in the `dinomaly_packed` Parquet metadata of {uri}")
            print(f"{len(layout['shards'])} shards, {layout['bad_count']} bad images left out")
        else:
            uri = write_manifest(table, args.output, data_config=config.data)
        print(format_counts(table))
        print(f"manifest of {table.num_rows} images written to {uri}")
        return 0

    resume = f"run the same command again to resume the pack (finished shards under {args.output} are kept)"
    return run_job(check, run, debug=args.debug, interrupted=resume if args.pack else "")


def check_manifest_output(output: str, packing: bool, data_config) -> None:
    """--output names a .parquet file (with --pack also a folder) that can be written: checked before indexing."""
    from dinomaly.data.storage import check_reachable, split_uri

    scheme, path = split_uri(output)
    if not packing and not scheme and Path(path).is_dir():
        raise ValueError(f"--output {output} is a folder; name the manifest file, e.g. {Path(path) / 'manifest.parquet'}")
    if not packing and not path.endswith(".parquet"):
        raise ValueError(f"--output {output}: a manifest is a Parquet file; name it <something>.parquet")
    if scheme:  # the bucket must exist; the key may be new
        check_reachable(f"{scheme}://{path.split('/', 1)[0]}", data_config)
        return
    parent = Path(path).parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"--output {output}: {parent} is a file, not a folder; choose another --output")


def print_bad(label: str, bad: list, count: int, where: str = "") -> None:
    """The first SHOWN_BAD bad rows, one line each, and how many more there are (and where they are listed)."""
    for image, reason in bad[:SHOWN_BAD]:
        print(f"{label}: {image}: {reason}")
    if count > SHOWN_BAD:
        print(f"... and {count - SHOWN_BAD} more{where}")


if __name__ == "__main__":
    sys.exit(main())
