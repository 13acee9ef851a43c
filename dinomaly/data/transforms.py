"""The reference image and mask transforms, split where the bytes cross a process boundary.

Reference: dataset.py get_data_transforms(448, 392) @c5c76d0:
    image: Resize((448, 448)) on the PIL image (bilinear) -> ToTensor -> CenterCrop(392) -> Normalize(ImageNet)
    mask:  Resize((448, 448)) on the PIL image (bilinear) -> CenterCrop(392) -> ToTensor (0..1 float)

ToTensor only divides by 255 and CenterCrop only slices, so resize + crop can run on uint8 (what the Ray
object store carries: 4x smaller than float32) and `normalize` finishes on the trainer. The split is exact:
the same float32 operations in the same order as ToTensor + Normalize (tests/test_transforms.py proves
max abs diff 0 against the torchvision composition).

Decoding is "as the reference does": `Image.open(...).convert('RGB')`. For the odd modes that means
(PIL 10-13, checked in tests): L and P are expanded to RGB; RGBA drops alpha (no blending with a
background); 16-bit grayscale (I;16) and 32-bit (I) are CLIPPED to 0..255 (a value of 1000 becomes 255,
no rescaling), so a full-range 16-bit image turns almost white. We reproduce that on purpose.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# PIL's own default; images above it are refused before their pixels are decoded.
DEFAULT_MAX_PIXELS = 89_478_485

# Fast decoding keeps the DCT-reduced image at least this many times the resize target on each side: at 1x
# (PIL's own draft rule) the reduced image differs from a full decode + resize by up to ~5 % of the range.
FAST_DECODE_MARGIN = 2

# What PIL raises on bytes that are not a complete image (UnidentifiedImageError is an OSError).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, TypeError)


class CorruptImageError(ValueError):
    """The bytes are not a complete, decodable image (zero-byte, truncated, not an image)."""


class MaskSizeError(ValueError):
    """A mask whose size differs from its image's: it would be stretched onto the wrong pixels."""


def check_mask_size(image_size: tuple[int, int], mask_size: tuple[int, int], uri: str, mask_uri: str) -> None:
    """Raise MaskSizeError naming both files when a mask's (width, height) differs from its image's."""
    if tuple(image_size) != tuple(mask_size):
        raise MaskSizeError(f"mask {mask_uri} is {mask_size[0]}x{mask_size[1]} but its image {uri} is "
                            f"{image_size[0]}x{image_size[1]}; a mask must cover its image pixel for pixel: "
                            "re-export the mask at the image's size or fix the mask's file name")


class ImageTooLargeError(CorruptImageError):
    """The image header announces more pixels than allowed (decompression-bomb guard)."""


def _open_fully(data: bytes, uri: str, max_pixels: int | None, draft_px: int | None = None) -> Image.Image:
    """Open and fully decode `data`; every failure becomes a CorruptImageError naming `uri`.

    draft_px: let a JPEG decode at a reduced DCT scale (see fast_decode_scale); other formats ignore it.
    The returned image's `info["original_size"]` is the (width, height) stored in the file.
    """
    where = f" ({uri})" if uri else ""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected the file's bytes, got {type(data).__name__}{where}")
    if not data:
        raise CorruptImageError(f"empty file (0 bytes){where}; re-copy or remove it from the dataset")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True in this process: truncated images "
                       "would decode silently; set it back to False")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if max_pixels is not None and width * height > max_pixels:
            raise ImageTooLargeError(f"image of {width}x{height} = {width * height} pixels exceeds "
                                     f"max_pixels={max_pixels}{where}; raise the limit if the file is trusted")
        image.info["original_size"] = (width, height)
        scale = fast_decode_scale(width, height, draft_px) if draft_px and image.format == "JPEG" else 1
        if scale > 1:
            image.draft(image.mode, (width // scale, height // scale))
        image.load()  # Image.open only reads the header; force the full decode so truncation shows here
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"decompression bomb refused by PIL{where}: {err}") from err
    except _DECODE_ERRORS as err:
        if isinstance(err, CorruptImageError):
            raise
        # PIL names the in-memory buffer (<_io.BytesIO object at 0x...>) where the file name belongs
        detail = "no image format recognised" if isinstance(err, UnidentifiedImageError) else \
            f"{type(err).__name__}: {err}"
        raise CorruptImageError(f"cannot decode image{where}: {detail}; the file is truncated or not an image") \
            from err
    return image


def fast_decode_scale(width: int, height: int, target_px: int) -> int:
    """The largest JPEG DCT reduction (1, 2, 4 or 8) whose image still has FAST_DECODE_MARGIN x target_px
    pixels on each side, so the bilinear resize to target_px still shrinks it (measured: tests/test_transforms.py,
    benchmarks/decode.py)."""
    for scale in (8, 4, 2):
        if min(width, height) >= scale * FAST_DECODE_MARGIN * target_px:
            return scale
    return 1


def original_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the file an image was decoded from, before any DCT reduction."""
    return image.info.get("original_size", image.size)


def decode_image(data: bytes, uri: str = "", max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 draft_px: int | None = None) -> Image.Image:
    """Bytes -> fully decoded PIL RGB image, converted exactly as the reference (`.convert('RGB')`).

    draft_px (fast decoding, None = off): a JPEG at least FAST_DECODE_MARGIN x 2 x draft_px on its short side
    is decoded at 1/2, 1/4 or 1/8 scale (PIL `Image.draft`), then resized as usual; `original_size` gives the
    file's size. PNG, TIFF, BMP and WebP always decode in full.

    Raises CorruptImageError (a ValueError) for zero-byte, truncated and non-image data, and
    ImageTooLargeError when width*height > max_pixels (None disables our check; PIL's own
    hard limit of 2x Image.MAX_IMAGE_PIXELS still applies).
    Reference: dataset.py MVTecDataset.__getitem__ `Image.open(img_path).convert('RGB')` @c5c76d0
    """
    image = _open_fully(data, uri, max_pixels, draft_px)
    size = original_size(image)
    rgb = image.convert("RGB")
    rgb.info["original_size"] = size
    return rgb


def decode_mask(data: bytes, uri: str = "", max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Bytes -> PIL 'L' mask with values 0 or 255 (every non-zero pixel -> 255).

    The value is taken from the raw array as VisA's prepare script does (palette *indices* for P,
    16-bit values for I;16); multi-channel masks take the max over colour channels, as the reference
    evaluation does. On 0/255 masks (MVTec AD, MPDD, Real-IAD, prepared VisA) this is the identity, so
    the tensors equal the reference; on raw VisA masks it reproduces prepare_visa.py's binarisation.
    Reference: prepare_data/prepare_visa.py `mask_array[mask_array != 0] = 255` @c5c76d0
    """
    image = _open_fully(data, uri, max_pixels)
    if image.mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LA", "PA"):
        bands = image.getbands()
        keep = [i for i, band in enumerate(bands) if band != "A"]
        values = np.asarray(image)[..., keep].max(axis=-1)
    else:
        values = np.asarray(image)
    return Image.fromarray(np.where(values != 0, 255, 0).astype(np.uint8), mode="L")


def center_crop_box(height: int, width: int, crop_size: int) -> tuple[int, int]:
    """(top, left) of torchvision's CenterCrop: int(round((H - c) / 2)), Python's round-half-even."""
    if crop_size > height or crop_size > width:
        raise ValueError(f"crop_size={crop_size} is larger than the resized image {height}x{width}; "
                         "set model.crop_size <= model.image_size")
    return int(round((height - crop_size) / 2.0)), int(round((width - crop_size) / 2.0))


def _resize_crop(image: Image.Image, image_size: int, crop_size: int) -> np.ndarray:
    resized = image.resize((image_size, image_size), Image.BILINEAR)  # torchvision F.resize on PIL
    array = np.asarray(resized)
    top, left = center_crop_box(array.shape[0], array.shape[1], crop_size)
    return np.ascontiguousarray(array[top:top + crop_size, left:left + crop_size])


def resize_crop_image(image: Image.Image, image_size: int, crop_size: int) -> np.ndarray:
    """PIL RGB -> uint8 [crop, crop, 3]: bilinear resize to image_size, centre crop (reference order)."""
    if image.mode != "RGB":
        raise ValueError(f"resize_crop_image expects an RGB image, got mode {image.mode}; use decode_image")
    return _resize_crop(image, image_size, crop_size)


def resize_crop_mask(mask: Image.Image, image_size: int, crop_size: int) -> np.ndarray:
    """PIL 'L' mask -> uint8 [crop, crop]: bilinear resize (edges become fractional), centre crop.

    The reference would stretch a mask of another size than its image; dinomaly.data.reader refuses such
    a mask first (check_mask_size).
    """
    if mask.mode != "L":
        raise ValueError(f"resize_crop_mask expects an 'L' mask, got mode {mask.mode}; use decode_mask")
    return _resize_crop(mask, image_size, crop_size)


def normalize(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [B,H,W,3] or [B,3,H,W] (or one image, 3-D) -> float32 [B,3,H,W]: ToTensor + Normalize.

    Channels-last is assumed when the last dim is 3. Same float32 ops and order as torchvision
    (x.float() / 255, then (x - mean) / std), so results are bit-identical.
    """
    import torch  # here, not at the top: decoding processes (Ray Data's read tasks) never load torch

    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # Ray Data hands out read-only views; torch warns on those
    tensor = torch.as_tensor(images)
    if tensor.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 pixels, got {tensor.dtype}")
    if tensor.ndim not in (3, 4):
        raise ValueError(f"normalize expects [B,H,W,3] or [B,3,H,W] (or 3-D), got shape {tuple(tensor.shape)}")
    if tensor.shape[-1] == 3:
        tensor = tensor.movedim(-1, -3)
    elif tensor.shape[-3] != 3:
        raise ValueError(f"normalize expects 3 colour channels first or last, got shape {tuple(tensor.shape)}")
    x = tensor.contiguous().to(torch.float32).div(255)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]
    return x.sub(mean).div(std)


def denormalize(image: torch.Tensor) -> np.ndarray:
    """The inverse of `normalize` for one image, for display: [3, H, W] float -> uint8 [H, W, 3]."""
    import torch

    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    pixels = (image.detach().float().cpu() * std + mean).clamp(0, 1) * 255
    return pixels.round().byte().permute(1, 2, 0).numpy()


def mask_to_tensor(masks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 [H,W] or [B,H,W] -> float32 [1,H,W] / [B,1,H,W] in 0..1 (ToTensor's / 255)."""
    import torch

    if isinstance(masks, np.ndarray) and not masks.flags.writeable:
        masks = masks.copy()  # an uncropped PIL view is read-only; torch warns on those
    tensor = torch.as_tensor(masks)
    if tensor.dtype != torch.uint8:
        raise ValueError(f"mask_to_tensor expects uint8, got {tensor.dtype}")
    return tensor.unsqueeze(-3).to(torch.float32).div(255)


def preprocess_image(image: Image.Image, image_size: int, crop_size: int) -> torch.Tensor:
    """PIL RGB -> normalised float32 [3, crop, crop], the reference image transform."""
    return normalize(resize_crop_image(image, image_size, crop_size))


def preprocess_mask(mask: Image.Image, image_size: int, crop_size: int) -> torch.Tensor:
    """PIL 'L' mask -> float32 [1, crop, crop] in 0..1, the reference mask transform."""
    return mask_to_tensor(resize_crop_mask(mask, image_size, crop_size))
