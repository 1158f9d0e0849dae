"""Load Dataset against hostile inputs: odd colour modes, 16-bit, animations, bombs, empty files, same names,
symlinks, unreadable folders, long reports, and 10,000 files. Nothing is lost silently; every skip says why."""

from __future__ import annotations

import errno
import json
import os
import random
import resource
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import ARTIFACTS
from PIL import Image, ImageFile

# Small settings: a 64x64 image is its own bucket, so pixels come back unresized and comparable.
SMALL = {"resolution": 64, "min_side": 32, "max_side": 128, "bucket_step": 16}


@pytest.fixture(scope="module")
def ds(pack):
    from lora_foundry.training.data import dataset
    return dataset


@pytest.fixture(scope="module")
def images(pack):
    from lora_foundry.training.data import images
    return images


def save(img: Image.Image, path: Path, **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **save_args)
    return path


def pixels(ds, dataset, name: str) -> np.ndarray:
    """The named item's image as loaded for training, in 0..255."""
    (item,) = [i for i in dataset.items if i.path.name == name]
    return ds.load_item_image(item)[0].numpy() * 255


def reasons(dataset) -> dict[str, str]:
    return {path.name: reason for path, reason in dataset.report.skipped}


# ---------------------------------------------------------------- colour modes


def sixteen_bit_gradient() -> np.ndarray:
    """64x64, dark to bright along x, spread over the whole 16-bit range (not multiples of 257)."""
    return np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (64, 1))


def test_16bit_greyscale_png_keeps_its_gradient(ds, tmp_path):
    values = sixteen_bit_gradient()
    save(Image.fromarray(values), tmp_path / "d" / "deep.png")
    eight = np.round(values / 257).astype(np.uint8)
    save(Image.fromarray(eight), tmp_path / "d" / "flat.png")
    dataset = ds.load_dataset(tmp_path / "d", **SMALL)
    with Image.open(tmp_path / "d" / "deep.png") as img:
        assert img.mode == "I;16"  # what the test is about: Pillow's 16-bit greyscale mode
    deep, flat = pixels(ds, dataset, "deep.png"), pixels(ds, dataset, "flat.png")
    assert deep.min() == 0 and deep.max() == 255 and (deep < 250).mean() > 0.9  # not clipped to white
    assert np.all(np.diff(deep[0, :, 0]) >= 0)
    np.testing.assert_allclose(deep, flat, atol=1.0)
    np.testing.assert_allclose(deep[..., 0], values / 257, atol=0.5 + 1e-4)


@pytest.mark.parametrize("dtype", [">u2", np.int32], ids=["I;16B", "I"])
def test_16bit_modes_scale_like_i16(images, dtype):
    values = sixteen_bit_gradient()
    img = Image.fromarray(values.astype(dtype))
    assert img.mode in ("I;16B", "I")
    rgb = np.asarray(images.to_rgb(img)).astype(np.float64)
    np.testing.assert_allclose(rgb[..., 1], values / 257, atol=0.5 + 1e-4)


def palette_image(transparent: bool) -> Image.Image:
    """Left half palette colour 1 (30, 120, 210), right half colour 2 (250, 10, 10), maybe transparent."""
    img = Image.new("P", (64, 64), 1)
    img.putpalette([0, 0, 0, 30, 120, 210, 250, 10, 10] + [0] * (256 * 3 - 9))
    img.paste(2, (32, 0, 64, 64))
    if transparent:
        img.info["transparency"] = 2
    return img


def halves(mode: str, left, right) -> Image.Image:
    img = Image.new(mode, (64, 64), left)
    img.paste(right, (32, 0, 64, 64))
    return img


def half_alpha(mode: str, colour: tuple, alpha: int) -> Image.Image:
    return halves(mode, (*colour, 255), (*colour, alpha))


def over_white(colour: tuple, alpha: int) -> tuple:
    return tuple(c * alpha / 255 + 255 * (1 - alpha / 255) for c in colour)


# (file name, the image, save options, expected RGB at the left half, at the right half, tolerance in 0..255)
MODES = [
    ("cmyk.jpg", Image.new("CMYK", (64, 64), (55, 215, 215, 51)), {"quality": 100},
     (160, 32, 32), (160, 32, 32), 3),
    ("grey.png", Image.new("L", (64, 64), 90), {}, (90, 90, 90), (90, 90, 90), 0),
    ("bilevel.png", halves("1", 0, 1), {}, (0, 0, 0), (255, 255, 255), 0),
    ("palette.png", palette_image(False), {}, (30, 120, 210), (250, 10, 10), 0),
    ("palette-t.png", palette_image(True), {}, (30, 120, 210), (255, 255, 255), 0),
    ("la.png", half_alpha("LA", (90,), 0), {}, (90, 90, 90), (255, 255, 255), 0),
    ("rgba.png", half_alpha("RGBA", (200, 40, 40), 128), {}, (200, 40, 40), over_white((200, 40, 40), 128), 1),
    ("rgb-key.png", halves("RGB", (0, 255, 0), (10, 20, 30)), {"transparency": (0, 255, 0)},  # colour key
     (255, 255, 255), (10, 20, 30), 0),
]


@pytest.mark.parametrize(("name", "img", "save_args", "left", "right", "tolerance"), MODES,
                         ids=[m[0] for m in MODES])
def test_colour_modes_load_as_rgb_with_their_colours(ds, tmp_path, name, img, save_args, left, right, tolerance):
    save(img, tmp_path / "d" / name, **save_args)
    dataset = ds.load_dataset(tmp_path / "d", **SMALL)
    rgb = pixels(ds, dataset, name)
    assert rgb.shape == (64, 64, 3)
    np.testing.assert_allclose(rgb[:, :32].reshape(-1, 3), np.broadcast_to(left, (64 * 32, 3)), atol=tolerance + 1e-3)
    np.testing.assert_allclose(rgb[:, 32:].reshape(-1, 3), np.broadcast_to(right, (64 * 32, 3)), atol=tolerance + 1e-3)


def test_an_unsupported_colour_mode_is_skipped_saying_what_to_do(ds, tmp_path):
    save(Image.new("F", (64, 64), 0.5), tmp_path / "d" / "float.png", format="TIFF")  # a TIFF named .png
    save(Image.new("RGB", (64, 64)), tmp_path / "d" / "ok.png")
    dataset = ds.load_dataset(tmp_path / "d", **SMALL)
    assert "unsupported colour mode F" in reasons(dataset)["float.png"]
    assert "save it as an 8-bit RGB" in reasons(dataset)["float.png"]


# ---------------------------------------------------------------- animations, truncation


@pytest.mark.parametrize("ext", ["webp", "png"])
def test_animated_image_uses_its_first_frame_and_says_so(ds, tmp_path, ext):
    first, second = Image.new("RGB", (64, 64), (250, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 250))
    path = save(first, tmp_path / "d" / f"anim.{ext}", save_all=True, append_images=[second], duration=100,
                lossless=True)
    save(Image.new("RGB", (64, 64)), tmp_path / "d" / "still.png")
    dataset = ds.load_dataset(tmp_path / "d", **SMALL)
    np.testing.assert_allclose(pixels(ds, dataset, f"anim.{ext}")[0, 0], (250, 0, 0), atol=1)
    assert dataset.report.animated == [path]
    summary = dataset.report.summary()
    assert "Animated images (1): the first frame of each is used" in summary and f"  {path}" in summary


def test_a_truncated_jpeg_is_still_caught_and_jpegs_keep_their_full_size(ds, tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (256, 320, 3), dtype=np.uint8)
    whole = save(Image.fromarray(noise), tmp_path / "d" / "whole.jpg", quality=90)
    cut = tmp_path / "d" / "cut.jpg"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    dataset = ds.load_dataset(tmp_path / "d", resolution=256, min_side=64, max_side=512)
    assert [(i.path.name, i.size) for i in dataset.items] == [("whole.jpg", (320, 256))]
    assert "not a readable image" in reasons(dataset)["cut.jpg"] and "truncated" in reasons(dataset)["cut.jpg"]


# ---------------------------------------------------------------- size limits, empty files


@pytest.fixture
def spy_decoding(monkeypatch) -> list[Path]:
    """The files Pillow decodes pixels of, in order."""
    decoded = []
    load = ImageFile.ImageFile.load

    def spy(self):
        decoded.append(Path(self.filename))
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return decoded


def test_image_over_the_pixel_limit_is_skipped_before_decoding(ds, images, tmp_path, monkeypatch, spy_decoding):
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 64 * 64)
    big = save(Image.new("RGB", (100, 80)), tmp_path / "d" / "big.png")
    save(Image.new("RGB", (64, 64)), tmp_path / "d" / "ok.png")
    dataset = ds.load_dataset(tmp_path / "d", **SMALL)
    assert [i.path.name for i in dataset.items] == ["ok.png"]
    assert reasons(dataset)["big.png"] == "too large: 100x80 (0.008 megapixels, the limit is 0.0041); downscale it"
    assert big not in spy_decoding and tmp_path / "d" / "ok.png" in spy_decoding


def test_pillows_own_bomb_limits_neither_crash_nor_warn(ds, tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # warns over 3000 pixels, refuses over 6000
    save(Image.new("RGB", (64, 64)), tmp_path / "d" / "warned.png")
    save(Image.new("RGB", (100, 80)), tmp_path / "d" / "refused.png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = ds.load_dataset(tmp_path / "d", **SMALL)
        (item,) = dataset.items
        ds.load_item_image(item)
    assert item.path.name == "warned.png"
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert reasons(dataset)["refused.png"].startswith("too large for Pillow (")
    assert reasons(dataset)["refused.png"].endswith("; downscale it")


def test_empty_file_is_skipped_with_a_clear_reason(ds, tmp_path):
    save(Image.new("RGB", (64, 64)), tmp_path / "d" / "ok.png")
    (tmp_path / "d" / "empty.jpg").touch()
    dataset = ds.load_dataset(tmp_path / "d", **SMALL)
    assert [i.path.name for i in dataset.items] == ["ok.png"]
    assert reasons(dataset)["empty.jpg"] == (
        "empty file (0 bytes), perhaps a copy that did not finish; copy it again or remove it")


# ---------------------------------------------------------------- names, symlinks, folders


def test_images_sharing_a_name_are_reported_with_their_caption(ds, tmp_path):
    root = tmp_path / "d"
    for name in ("a.png", "a.jpg", "b.png", "sub/c.png", "sub/c.webp"):
        save(Image.new("RGB", (64, 64)), root / name)
    (root / "a.txt").write_text("a red thing", encoding="utf-8")
    (root / "b.txt").write_text("b", encoding="utf-8")
    dataset = ds.load_dataset(root, **SMALL)
    assert len(dataset.items) == 5
    assert dataset.report.shared_captions == [
        ((root / "a.jpg", root / "a.png"), root / "a.txt"),
        ((root / "sub" / "c.png", root / "sub" / "c.webp"), None),
    ]
    summary = dataset.report.summary()
    assert "Images with the same name in one folder (2)" in summary and "rename all but one" in summary
    assert f"  {root / 'a.jpg'}, {root / 'a.png'}: share {root / 'a.txt'}" in summary
    assert f"  {root / 'sub' / 'c.png'}, {root / 'sub' / 'c.webp'}: no caption file yet" in summary


def test_symlinked_folders_are_reported_not_followed_and_loops_end(ds, tmp_path):
    from lora_foundry.training.data import scan

    root, outside = tmp_path / "d", tmp_path / "outside"
    save(Image.new("RGB", (64, 64)), root / "sub" / "x.png")
    save(Image.new("RGB", (64, 64)), outside / "o.png")
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "y.png").symlink_to(outside / "o.png")  # a symlinked image file is used as it is
    dataset = ds.load_dataset(root, **SMALL)
    assert sorted(i.path for i in dataset.items) == [root / "sub" / "x.png", root / "y.png"]
    assert sorted(dataset.report.skipped) == [(root / "linked", scan.LINKED_FOLDER),
                                              (root / "sub" / "loop", scan.LINKED_FOLDER)]
    assert scan.LINKED_FOLDER.startswith("symlink to a folder, not followed; ")
    assert f"{root / 'linked'}: symlink to a folder, not followed" in dataset.report.summary()


def deny(monkeypatch, *folders: Path) -> None:
    """os.scandir fails for `folders` as for a folder without read permission (tests run as root: chmod would not)."""
    scandir = os.scandir

    def guarded(path=".", *args):
        if Path(path) in folders:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path, *args)

    monkeypatch.setattr(os, "scandir", guarded)


def test_unreadable_folder_is_reported(ds, tmp_path, monkeypatch):
    root = tmp_path / "d"
    save(Image.new("RGB", (64, 64)), root / "ok.png")
    save(Image.new("RGB", (64, 64)), root / "locked" / "hidden.png")
    deny(monkeypatch, root / "locked")
    dataset = ds.load_dataset(root, **SMALL)
    assert [i.path.name for i in dataset.items] == ["ok.png"]
    assert dataset.report.skipped == [
        (root / "locked", "folder cannot be read (Permission denied); check its permissions")]


def test_unreadable_root_says_so_in_the_error(ds, tmp_path, monkeypatch):
    save(Image.new("RGB", (64, 64)), tmp_path / "d" / "ok.png")
    deny(monkeypatch, tmp_path / "d")
    with pytest.raises(ds.DatasetError, match="no usable image") as error:
        ds.load_dataset(tmp_path / "d", **SMALL)
    assert f"{tmp_path / 'd'}: folder cannot be read (Permission denied); check its permissions" in str(error.value)


# ---------------------------------------------------------------- long reports, 10,000 files


def test_summary_lists_at_most_20_lines_per_list(ds, tmp_path):
    root = tmp_path / "d"
    for i in range(25):
        save(Image.new("RGB", (64, 64)), root / f"good{i:02d}.png")
        (root / f"good{i:02d}.txt").write_bytes(b"caf\xe9")  # Latin-1, not UTF-8
    for i in range(30):
        (root / f"empty{i:02d}.png").touch()
    report = ds.load_dataset(root, **SMALL).report
    assert (len(report.skipped), len(report.caption_errors)) == (30, 25)  # the report keeps everything
    lines = report.summary().splitlines()
    assert sum("cannot be read as UTF-8" in line for line in lines) == 20
    assert sum("empty file (0 bytes)" in line for line in lines) == 20
    assert "  ... and 5 more" in lines and "  ... and 10 more" in lines
    assert lines.index("  ... and 5 more") < lines.index("  ... and 10 more")  # caption errors come first


def memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def reset_peak_memory() -> bool:
    """Reset VmHWM to the current RSS (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@pytest.mark.slow
def test_ten_thousand_images_load_in_bounded_time_and_memory(ds, tmp_path):
    root = tmp_path / "d"
    rng = random.Random(0)
    for i in range(10_000):
        folder = root / f"{1 + i // 2500}_token{i // 2500}"
        if i % 2500 == 0:
            folder.mkdir(parents=True)
        Image.new("RGB", (16, 16), (rng.randrange(256), 40, 40)).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(f"image {i}, red", encoding="utf-8")
    exact_peak = reset_peak_memory()
    rss = memory_kib("VmRSS")
    peak_before = rss if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    dataset = ds.load_dataset(root, resolution=64, min_side=16, max_side=128, bucket_step=16)
    seconds = time.perf_counter() - start
    peak_growth_mib = (memory_kib("VmHWM") - peak_before) / 1024
    summary = dataset.report.summary()
    assert len(dataset.items) == 10_000 and dataset.report.captions_found == 10_000
    assert len(summary.splitlines()) < 30
    result = {"images": 10_000, "size": "16x16 PNG + caption", "seconds": round(seconds, 2),
              "ms_per_image": round(seconds / 10, 3), "peak_rss_growth_mib": round(peak_growth_mib, 1),
              "peak_is_exact": exact_peak, "cpus": os.cpu_count()}
    print(f"\nLoad Dataset, 10,000 images: {json.dumps(result)}")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "dataset_10k.json").write_text(json.dumps(result, indent=2))
    assert seconds < 60 and peak_growth_mib < 300


def test_16bit_mask_keeps_its_black_and_white(pack, tmp_path):
    """A 16-bit greyscale mask (as image editors export them): black stays 0 and white 1, not all white."""
    from lora_foundry.training.data.masks import load_mask

    values = np.zeros((64, 64), dtype=np.uint16)
    values[:, 32:] = 65535
    mask = save(Image.fromarray(values), tmp_path / "mask.png")
    image = save(Image.new("RGB", (64, 64), "red"), tmp_path / "image.png")
    assert Image.open(mask).mode.startswith("I")
    loaded = load_mask(image, mask, (64, 64)).numpy()
    assert loaded[:, :32].max() == 0.0 and loaded[:, 32:].min() == 1.0
