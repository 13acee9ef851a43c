"""Build a Parquet manifest (one row per image) from a dataset folder or bucket and print its counts.

    python pipelines/prepare_data.py --root /data/mvtec --out manifests/mvtec.parquet
    python pipelines/prepare_data.py --layout realiad --root s3://bucket/Real-IAD --out s3://bucket/realiad.parquet
    python pipelines/prepare_data.py --root ./mvtec --upload-to s3://bucket/mvtec --out s3://bucket/mvtec.parquet
"""

from __future__ import annotations

import argparse
import sys

from dinomaly.config import apply_overrides, load_config
from dinomaly.config.cli import entry_parser, start_logging
from dinomaly.data.layouts import LAYOUTS
from dinomaly.data.manifest import build_manifest, format_counts, records_from_config, write_manifest
from dinomaly.data.storage import upload_tree


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = entry_parser(__doc__, config_help="YAML preset or path whose data section is the base",
                          set_example="--set data.realiad_json_variant=realiad_jsons_sv", keys=False)
    parser.epilog = ("Layouts: mvtec/mpdd/visa = <cls>/train/good, test/<defect>, ground_truth/<defect>; visa_raw = "
                     "<cls>/Data/Images + split_csv/1cls.csv; realiad = realiad_1024/ + realiad_jsons/<variant>/; "
                     "folder = <cls>/good, [<cls>/defect/<type>], [<cls>/masks/<type>]. Other data.* keys "
                     "(realiad_json_variant, visa_split_csv, folder_test_fraction) go through --set.")
    parser.add_argument("--root", required=True, help="dataset folder or s3://bucket/prefix")
    parser.add_argument("--out", required=True, help="manifest to write (.parquet, local path or s3:// URI)")
    parser.add_argument("--layout", default="auto", choices=["auto", *LAYOUTS], help="dataset layout (default: auto)")
    parser.add_argument("--categories", default="", help="comma-separated classes to keep (default: all)")
    parser.add_argument("--upload-to", default="", metavar="URI",
                        help="first copy the local --root to this bucket prefix, then index the copy")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_logging()
    categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    config = apply_overrides(load_config(args.config, args.set), {
        "data.root": args.upload_to or args.root, "data.layout": args.layout, "data.categories": categories})
    if args.upload_to:
        upload_tree(args.root, args.upload_to, config.data)
    table = build_manifest(records_from_config(config.data))
    uri = write_manifest(table, args.out, data_config=config.data)
    print(format_counts(table))
    print(f"manifest of {table.num_rows} images written to {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
