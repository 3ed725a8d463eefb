"""Odd images staging must get right: 16-bit samples scaled (not clipped), EXIF orientation applied once and
never kept, and bad-file reasons that are the same in every run.

Images are real PNG/JPEG/TIFF/PGM bytes made here with PIL or OpenCV and planted in an extracted copy of the
demo ImageNet, or fed to `encode_tiers`, the function every unit runs on each image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

from pipelines.dataset import MANIFEST
from pipelines.source.demo import DemoSummary, extract_to_tree
from pipelines.staging.images import BadImage, _decode, encode_tiers, tier_size

from helpers import STAGE_PARAMS, plant_train_file, read_samples, stage_directly, work_of

ORIENTATION = 0x0112


@pytest.fixture(scope="module")
def tree(demo_archives: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An extracted copy of the demo ImageNet that tests copy before planting files (it stays as it is)."""
    return extract_to_tree(demo_archives, tmp_path_factory.mktemp("images") / "tree", "tree")


def _copy_tree(tree: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(tree, tmp_path / "tree"))


def _decoded(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"), dtype=np.float64)


# --------------------------------------------------------------------------------------------- 16-bit samples


def _gradient16(width: int = 256, height: int = 64) -> np.ndarray:
    """A horizontal 0..65535 ramp: mean 32767.5, i.e. 127.5 once scaled to 8 bits (a clip gives ~252)."""
    return np.tile(np.linspace(0, 65535, width).round().astype(np.uint16), (height, 1))


def _scaled_mean(samples: np.ndarray) -> float:
    return float(np.mean(np.round(samples.astype(np.float64) * 255 / 65535)))


def _png16_grey() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_gradient16()).save(buf, format="PNG")  # PIL reads it back as mode I;16
    return buf.getvalue()


def test_a_16_bit_grey_png_named_jpeg_is_staged_scaled_not_clipped(tree: Path, tmp_path: Path) -> None:
    data = _png16_grey()
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).mean() > 250  # what PIL's convert gives
    source = _copy_tree(tree, tmp_path)
    wnid = sorted(p.name for p in (source / "train").iterdir())[0]
    plant_train_file(source, wnid, f"{wnid}_990001.JPEG", data)
    params = dataclasses.replace(STAGE_PARAMS, tiers=(32, 256), minival=0.0)  # 256 px: the full image
    dest = stage_directly(source, tmp_path / "datasets", params)
    staged = read_samples(dest, "train", 256)[f"{wnid}_990001"]["jpg"]
    img = Image.open(io.BytesIO(staged))
    assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (256, 64))
    pixels = _decoded(staged)
    assert abs(pixels.mean() - _scaled_mean(_gradient16())) < 1.5  # ~127.5, not ~252
    # Scaled per sample, not only on average: each column's value, within JPEG's error.
    expected = np.round(_gradient16()[0].astype(np.float64) * 255 / 65535)
    assert np.abs(pixels.mean(axis=(0, 2)) - expected).max() < 4
    small = _decoded(read_samples(dest, "train", 32)[f"{wnid}_990001"]["jpg"])
    assert abs(small.mean() - 127.5) < 2


def _png16_rgb() -> tuple[bytes, np.ndarray]:
    ramp = _gradient16()
    rgb = np.stack([ramp, ramp[:, ::-1], ramp // 2], axis=-1)
    ok, png = cv2.imencode(".png", rgb[..., ::-1])  # OpenCV writes BGR
    assert ok
    return png.tobytes(), rgb


def _encoded(fmt: str, image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    "name, make, mode",
    [
        ("grey PNG", lambda: _png16_grey(), "I;16"),
        ("grey TIFF", lambda: _encoded("TIFF", Image.fromarray(_gradient16())), "I;16"),
        ("big-endian TIFF", lambda: _encoded("TIFF", Image.frombytes("I;16B", (256, 64),
                                                                     _gradient16().astype(">u2").tobytes())), "I;16B"),
        ("grey PGM", lambda: _encoded("PPM", Image.fromarray(_gradient16())), "I"),
        ("32-bit TIFF in 0..65535", lambda: _encoded("TIFF", Image.fromarray(_gradient16().astype(np.int32))),
         "I"),
    ],
)
def test_16_bit_grey_in_any_mode_pil_opens_is_scaled(name: str, make, mode: str) -> None:  # noqa: ANN001
    data = make()
    if Image.open(io.BytesIO(data)).mode != mode:
        pytest.skip(f"this Pillow opens the {name} as {Image.open(io.BytesIO(data)).mode}")
    (jpeg, w, h), = encode_tiers(data, (256,), quality=95).values()
    assert (w, h) == (256, 64)
    assert abs(_decoded(jpeg).mean() - _scaled_mean(_gradient16())) < 1.5, name


def test_a_16_bit_rgb_png_is_scaled_per_channel() -> None:
    # PIL reads it as 8-bit RGB by the high byte of each sample; staging scales the 16-bit values.
    data, rgb = _png16_rgb()
    (jpeg, _, _), = encode_tiers(data, (256,), quality=95).values()
    pixels = _decoded(jpeg)
    for channel in range(3):
        assert abs(pixels[..., channel].mean() - _scaled_mean(rgb[..., channel])) < 1.5, channel


@pytest.mark.parametrize(
    "samples, reason",
    [
        (_gradient16().astype(np.float32) / 65535, "floating-point samples (PIL mode F)"),
        (_gradient16().astype(np.int32) * 4 - 100, "32-bit integer samples outside 0..65535 (PIL mode I)"),
    ],
)
def test_samples_without_an_8_bit_scale_are_bad_files_with_a_stable_reason(samples: np.ndarray, reason: str) -> None:
    data = _encoded("TIFF", Image.fromarray(samples))
    with pytest.raises(BadImage) as first:
        encode_tiers(data, (32,), quality=90)
    with pytest.raises(BadImage) as second:
        encode_tiers(data, (32,), quality=90)
    assert reason in str(first.value) and str(first.value) == str(second.value)


# --------------------------------------------------------------------------------------------- EXIF orientation


def _landscape(size: tuple[int, int] = (120, 80)) -> Image.Image:
    """Large colour blocks and a marker corner: any flip or turn changes the pixels a lot, resizing little."""
    w, h = size
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[:, : w // 2] = (220, 40, 40)
    pixels[:, w // 2 :] = (40, 60, 220)
    pixels[: h // 3, : w // 3] = (40, 200, 60)
    pixels[h // 2 :, w - w // 4 :] = (240, 230, 40)
    return Image.fromarray(pixels)


def _with_orientation(image: Image.Image, orientation: int, fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    buf = io.BytesIO()
    image.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orientation_is_applied_exactly_as_exif_transpose(orientation: int) -> None:
    # Lossless (PNG) so that the pixels can be compared exactly; a tier above the image keeps its size.
    data = _with_orientation(_landscape((7, 5)), orientation, fmt="PNG")
    original = Image.open(io.BytesIO(data))
    assert original.getexif()[ORIENTATION] == orientation
    upright = np.asarray(ImageOps.exif_transpose(original).convert("RGB"))
    pixels, kept, size = _decode(data, (64,))
    assert not kept and size == (upright.shape[1], upright.shape[0])
    assert np.array_equal(pixels[..., ::-1], upright)


def test_an_oriented_jpeg_is_staged_upright_at_every_tier_without_the_tag(tree: Path, tmp_path: Path) -> None:
    stored = _landscape()  # 120 x 80 as stored; orientation 6: shown turned 90 degrees clockwise, 80 x 120
    data = _with_orientation(stored, 6)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert upright.size == (80, 120)
    source = _copy_tree(tree, tmp_path)
    wnid = sorted(p.name for p in (source / "train").iterdir())[1]
    key = f"{wnid}_990002"
    plant_train_file(source, wnid, f"{key}.JPEG", data)
    # 256: a tier the image fits, whose original bytes staging would otherwise keep; 32 and 64: re-encoded.
    params = dataclasses.replace(STAGE_PARAMS, tiers=(32, 64, 256), minival=0.0)
    dest = stage_directly(source, tmp_path / "datasets", params)
    for tier in params.tiers:
        jpeg = read_samples(dest, "train", tier)[key]["jpg"]
        img = Image.open(io.BytesIO(jpeg))
        size = tier_size(80, 120, tier)
        assert img.size == size and size[0] < size[1], tier  # portrait
        assert ORIENTATION not in img.getexif(), tier
        # Every decoder sees the same pixels: PIL as is, PIL with exif_transpose, OpenCV's default (which rotates).
        plain = np.asarray(img.convert("RGB"), np.float64)
        assert np.array_equal(np.asarray(ImageOps.exif_transpose(img).convert("RGB"), np.float64), plain)
        bgr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
        assert bgr.shape[:2] == (size[1], size[0]) and np.abs(bgr[..., ::-1] - plain).mean() < 1, tier
        expected = np.asarray(upright.convert("RGB").resize(size, Image.Resampling.BOX), np.float64)
        unrotated = np.asarray(stored.resize(size[::-1], Image.Resampling.BOX).transpose(Image.Transpose.TRANSPOSE),
                               np.float64)  # the stored pixels, not turned, in a portrait frame
        assert np.abs(plain - expected).mean() < 8, tier
        assert np.abs(plain - unrotated).mean() > 40, tier  # the check above tells the orientations apart
    meta = json.loads((work_of(dest, params) / "units" / f"train-{wnid}.json").read_text())
    (record,) = [r for r in meta["records"] if r["key"] == key]
    assert "origin" not in record and all(offset is not None for offset, *_ in record["tiers"].values())


def test_an_xmp_orientation_counts_as_exif_transpose_reads_it() -> None:
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="8"/></rdf:RDF></x:xmpmeta>')
    buf = io.BytesIO()
    _landscape().save(buf, format="JPEG", quality=95, xmp=xmp)
    data = buf.getvalue()
    assert ImageOps.exif_transpose(Image.open(io.BytesIO(data))).size == (80, 120)
    (jpeg, w, h), = encode_tiers(data, (256,), quality=90).values()
    assert (w, h) == (80, 120) and jpeg != data and Image.open(io.BytesIO(jpeg)).size == (80, 120)


def test_a_jpeg_without_an_orientation_tag_is_still_kept_as_it_is() -> None:
    buf = io.BytesIO()
    _landscape().save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    out = encode_tiers(data, (32, 256), quality=90)
    assert out[256] == (data, 120, 80)


# --------------------------------------------------------------------------------------------- bad-file reasons


def test_a_non_image_gets_a_reason_without_a_memory_address() -> None:
    with pytest.raises(BadImage) as info:
        encode_tiers(b"this is a text file, not an image\n", (32,), quality=90)
    assert str(info.value) == "does not decode: UnidentifiedImageError: cannot identify image file"


def test_two_clean_runs_over_a_source_with_a_non_image_write_identical_manifests(
    tree: Path, tmp_path: Path, demo_summary: DemoSummary
) -> None:
    source = _copy_tree(tree, tmp_path)
    wnid = demo_summary.wnids[2]
    plant_train_file(source, wnid, f"{wnid}_990003.JPEG", b"<html>a saved web page, not a JPEG</html>\n")
    params = dataclasses.replace(STAGE_PARAMS, max_bad_fraction=0.1)
    first = stage_directly(source, tmp_path / "one", params)
    second = stage_directly(source, tmp_path / "two", params)
    manifest = (first / MANIFEST).read_bytes()
    assert hashlib.sha256(manifest).hexdigest() == hashlib.sha256((second / MANIFEST).read_bytes()).hexdigest()
    bad = {b["source"]: b["reason"] for b in json.loads(manifest)["bad_files"]}
    assert bad[f"{wnid}_990003.JPEG"] == "does not decode: UnidentifiedImageError: cannot identify image file"
    assert not any("0x" in reason or " at " in reason for reason in bad.values()), bad
