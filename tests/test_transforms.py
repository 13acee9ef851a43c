"""The split uint8 resize+crop / normalize pipeline equals the reference torchvision composition exactly."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torchvision import transforms as T

from dinomaly.data.textures import jpeg_bytes, synthetic_photo
from dinomaly.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptImageError,
    ImageTooLargeError,
    decode_image,
    decode_mask,
    denormalize,
    fast_decode_scale,
    normalize,
    preprocess_image,
    preprocess_mask,
    resize_crop_image,
)


def reference_transforms(size, isize):
    """dataset.py get_data_transforms(size, isize) @c5c76d0, rebuilt from torchvision."""
    image = T.Compose([T.Resize((size, size)), T.ToTensor(), T.CenterCrop(isize),
                       T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)])
    mask = T.Compose([T.Resize((size, size)), T.CenterCrop(isize), T.ToTensor()])
    return image, mask


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def sample_images() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)  # non-square on purpose
    gray = rng.integers(0, 256, (70, 90), dtype=np.uint8)
    alpha = rng.integers(0, 256, (70, 90, 1), dtype=np.uint8)
    deep = rng.integers(0, 1200, (70, 90), dtype=np.uint16)  # 16-bit, partly above 255
    return {
        "RGB": Image.fromarray(rgb),
        "L": Image.fromarray(gray),
        "RGBA": Image.fromarray(np.concatenate([rgb, alpha], -1)),
        "P": Image.fromarray(rgb).quantize(colors=32),
        "I;16": Image.fromarray(deep),
    }


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P", "I;16"])
@pytest.mark.parametrize("size,isize", [(448, 392), (128, 112), (101, 84)])
def test_image_pipeline_equals_reference_composition_exactly(mode, size, isize):
    source = sample_images()[mode]
    data = encode(source)
    assert Image.open(io.BytesIO(data)).mode == mode  # the file really is in that mode
    reference_image, _ = reference_transforms(size, isize)
    expected = reference_image(Image.open(io.BytesIO(data)).convert("RGB"))
    ours = preprocess_image(decode_image(data), size, isize)
    assert ours.dtype == torch.float32 and ours.shape == (3, isize, isize)
    assert torch.equal(ours, expected), f"max abs diff {(ours - expected).abs().max()}"  # max abs diff 0


def test_batched_normalize_of_uint8_crops_equals_reference_channels_last_or_first():
    images = [decode_image(encode(im)) for im in sample_images().values()]
    reference_image, _ = reference_transforms(128, 112)
    expected = torch.stack([reference_image(im) for im in images])
    crops = np.stack([resize_crop_image(im, 128, 112) for im in images])  # uint8 [B,112,112,3]
    assert crops.dtype == np.uint8 and crops.shape == (5, 112, 112, 3)
    assert torch.equal(normalize(crops), expected)
    assert torch.equal(normalize(torch.from_numpy(crops).permute(0, 3, 1, 2)), expected)
    assert all(np.array_equal(denormalize(image), crop) for image, crop in zip(normalize(crops), crops))  # display


def test_normalize_rejects_float_and_bad_shapes():
    with pytest.raises(ValueError, match="uint8"):
        normalize(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="channels"):
        normalize(np.zeros((1, 8, 8, 4), np.uint8))


def test_conversions_follow_pil_convert_rgb():
    """RGBA drops alpha (no blending); 16-bit values are clipped to 255, not rescaled (PIL's convert)."""
    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [200, 100, 50, 255]]], np.uint8))
    assert np.asarray(decode_image(encode(rgba))).tolist() == [[[10, 20, 30], [200, 100, 50]]]
    deep = Image.fromarray(np.array([[0, 100, 255, 256, 1000, 65535]], np.uint16))
    assert np.asarray(decode_image(encode(deep)))[0, :, 0].tolist() == [0, 100, 255, 255, 255, 255]
    gray = Image.fromarray(np.array([[7, 99]], np.uint8))
    assert np.asarray(decode_image(encode(gray))).tolist() == [[[7, 7, 7], [99, 99, 99]]]


def test_binary_mask_pipeline_equals_reference_mask_transform():
    mask = np.zeros((60, 80), np.uint8)
    mask[10:25, 30:47] = 255
    data = encode(Image.fromarray(mask))
    _, reference_mask = reference_transforms(448, 392)
    expected = reference_mask(Image.open(io.BytesIO(data)))
    ours = preprocess_mask(decode_mask(data), 448, 392)
    assert ours.shape == (1, 392, 392)
    assert torch.equal(ours, expected)
    fractional = ours[(ours > 0) & (ours < 1)]
    assert fractional.numel() > 0  # bilinear resize makes soft edges, binarised only at evaluation


def test_mask_of_another_size_is_resized_independently_like_the_reference():
    """The reference resizes image and mask to 448 each on its own: a half-size mask is stretched."""
    mask = np.zeros((35, 45), np.uint8)  # the image is 70x90
    mask[5:12, 15:23] = 255
    data = encode(Image.fromarray(mask))
    _, reference_mask = reference_transforms(448, 392)
    ours = preprocess_mask(decode_mask(data), 448, 392)
    image = preprocess_image(decode_image(encode(sample_images()["RGB"])), 448, 392)
    assert ours.shape[1:] == image.shape[1:]
    assert torch.equal(ours, reference_mask(Image.open(io.BytesIO(data))))


def test_decode_mask_binarises_like_prepare_visa():
    raw = np.zeros((20, 20), np.uint8)
    raw[5:9, 5:9] = 1  # raw VisA masks are not 0/255
    raw[12:14, 2:4] = 3
    assert set(np.unique(np.asarray(decode_mask(encode(Image.fromarray(raw)))))) == {0, 255}
    binarised = np.where(raw != 0, 255, 0).astype(np.uint8)
    assert np.array_equal(np.asarray(decode_mask(encode(Image.fromarray(raw)))), binarised)
    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[5:9, 5:9, 2] = 255  # colour masks: any channel counts (evaluation takes the max over channels)
    assert np.array_equal(np.asarray(decode_mask(encode(Image.fromarray(rgb)))) > 0, rgb.max(-1) > 0)


def corrupt_payloads() -> dict[str, bytes]:
    png = encode(sample_images()["RGB"], "PNG")
    jpeg = encode(sample_images()["RGB"], "JPEG")
    return {"zero-byte": b"", "truncated PNG": png[: len(png) // 2], "truncated JPEG": jpeg[: len(jpeg) // 2],
            "text": b"this is not an image\n", "PNG header only": png[:40]}


@pytest.mark.parametrize("kind", list(corrupt_payloads()))
def test_corrupt_files_raise_corrupt_image_error_naming_the_uri(kind):
    data = corrupt_payloads()[kind]
    for decode in (decode_image, decode_mask):
        with pytest.raises(CorruptImageError, match="s3://bucket/x.png") as info:
            decode(data, uri="s3://bucket/x.png")
        assert isinstance(info.value, ValueError)
        assert "object at 0x" not in str(info.value)  # PIL's own message names its in-memory buffer
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_pixel_limit_refuses_large_images_before_decoding():
    data = encode(Image.new("RGB", (100, 100)))
    with pytest.raises(ImageTooLargeError, match="10000 pixels"):
        decode_image(data, uri="big.png", max_pixels=5000)
    assert decode_image(data, max_pixels=None).size == (100, 100)


# Fast decoding's tolerance against full decode + resize, in uint8 levels of the 392/224 crop (see README).
FAST_DECODE_MAX_DIFF = 8
FAST_DECODE_MEAN_DIFF = 1.0


@pytest.mark.parametrize("size_px,image_size,crop_size,scale", [(1024, 256, 224, 2), (2048, 448, 392, 2),
                                                               (2048, 256, 224, 4)])
def test_fast_decode_stays_within_tolerance_of_a_full_decode(size_px, image_size, crop_size, scale):
    """DCT-scaled JPEG decoding on textured photographs: the crop differs from the reference's by at most 8/255."""
    data = jpeg_bytes(synthetic_photo(size_px, seed=size_px + image_size))
    fast = decode_image(data, "x.jpg", draft_px=image_size)
    assert fast.size == (size_px // scale, size_px // scale) == tuple(s // scale for s in fast.info["original_size"])
    reference = resize_crop_image(decode_image(data), image_size, crop_size).astype(np.int16)
    diff = np.abs(resize_crop_image(fast, image_size, crop_size).astype(np.int16) - reference)
    assert diff.max() <= FAST_DECODE_MAX_DIFF and diff.mean() <= FAST_DECODE_MEAN_DIFF, (diff.max(), diff.mean())
    assert diff.max() > 0  # the check can fail: DCT scaling did change pixels


def test_fast_decode_leaves_small_jpegs_and_other_formats_in_full():
    photo = synthetic_photo(512)
    assert fast_decode_scale(1024, 1024, 448) == 1 and fast_decode_scale(4096, 3000, 448) == 2
    assert decode_image(jpeg_bytes(photo), draft_px=448).size == (512, 512)
    big = photo.resize((1024, 1024))  # a JPEG of this size would decode at 1/2 for draft_px=256
    for fmt in ("PNG", "TIFF", "BMP"):
        assert decode_image(encode(big, fmt), draft_px=256).size == (1024, 1024)
