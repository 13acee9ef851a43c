"""One row per image (ImageRecord) and the name-based pairing of images with masks.

Shared by the layout readers (dinomaly.data.layouts), which turn folders, csv and JSON splits into
these records; dinomaly.data.manifest turns them into Parquet rows.
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow.fs as pafs

from dinomaly.data.paths import DataRoot

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
_SHOW = 5  # how many file names an error message lists


@dataclass(frozen=True, slots=True)
class ImageRecord:
    """One image: where it is, its label (1 = anomalous) and mask, class, defect type and split."""

    image_uri: str
    label: int
    category: str
    defect: str
    split: str
    mask_uri: str | None = None
    sample_id: str | None = None
    view: str | None = None
    size_bytes: int = 0


# --------------------------------------------------------------------------- small helpers


def is_image(name: str) -> bool:
    return not name.startswith(".") and posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def file_stem(name: str) -> str:
    return posixpath.splitext(posixpath.basename(name))[0]


def mask_key(name: str) -> str:
    base = file_stem(name)
    return base[: -len("_mask")] if base.endswith("_mask") else base


def list_names(paths: Sequence[str]) -> str:
    shown = [posixpath.basename(p) for p in sorted(paths)[:_SHOW]]
    more = f" and {len(paths) - _SHOW} more" if len(paths) > _SHOW else ""
    return ", ".join(shown) + more


def pair_masks(images: Sequence[str], masks: Sequence[str], where: str) -> dict[str, str]:
    """Pair image paths with mask paths by stem (`000.png` <-> `000_mask.png` / `000.png`).

    Raises ValueError naming the unmatched files on either side; never falls back to sort order.
    """
    by_key: dict[str, str] = {}
    for mask in masks:
        key = mask_key(mask)
        if key in by_key:
            raise ValueError(f"{where}: masks {posixpath.basename(by_key[key])} and {posixpath.basename(mask)} "
                             "both match the same image; keep one")
        by_key[key] = mask
    image_keys = {file_stem(image): image for image in images}
    if len(image_keys) != len(images):
        raise ValueError(f"{where}: two images share a name with different extensions ({list_names(images)}); "
                         "masks are paired by name, so rename one")
    missing = [image for key, image in image_keys.items() if key not in by_key]
    orphans = [mask for key, mask in by_key.items() if key not in image_keys]
    if missing or orphans:
        parts = []
        if missing:
            parts.append(f"{len(missing)} defective image(s) without a mask: {list_names(missing)}")
        if orphans:
            parts.append(f"{len(orphans)} mask(s) without an image: {list_names(orphans)}")
        raise ValueError(f"{where}: {'; '.join(parts)}. Masks are paired by name: name the mask of "
                         "<stem>.png either <stem>_mask.png or <stem>.png")
    return {image: by_key[key] for key, image in image_keys.items()}


def select_classes(found: Sequence[str], categories: Sequence[str] | None, data: DataRoot) -> list[str]:
    if not found:
        raise ValueError(f"no classes found under {data.uri}")
    if not categories:
        return sorted(found)
    unknown = [c for c in categories if c not in found]
    if unknown:
        raise ValueError(f"categories {unknown} not found under {data.uri}; classes found: {sorted(found)}; "
                         "fix data.categories (empty = all)")
    return list(categories)


def list_tree(data: DataRoot, rel: str) -> dict[str, int]:
    """All files below `rel` (recursive): {path relative to rel: size in bytes}; {} if it is absent."""
    base = data.path(rel)
    infos = data.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    prefix = base.rstrip("/") + "/"
    return {info.path[len(prefix):]: int(info.size or 0)
            for info in infos if info.type == pafs.FileType.File and info.path.startswith(prefix)}
