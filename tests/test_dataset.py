"""The Load Dataset side: buckets, captions, folder scanning, report, validation split, epoch order, images."""

from __future__ import annotations

import importlib
import os
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from harness.comfy import import_pack, setup_inprocess
from PIL import Image


@pytest.fixture(scope="module")
def lf() -> SimpleNamespace:
    """The pack's training modules, imported the way ComfyUI imports the pack."""
    setup_inprocess()
    pack = import_pack()
    name = pack.__name__
    return SimpleNamespace(
        buckets=importlib.import_module(f"{name}.training.data.buckets"),
        captions=importlib.import_module(f"{name}.training.data.captions"),
        dataset=importlib.import_module(f"{name}.training.data.dataset"),
    )


def save_image(path: Path, size: tuple[int, int], color=(200, 40, 40), **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, **save_args)
    return path


def gradient_image(width: int, height: int) -> Image.Image:
    """Red grows with x (2 per px), green with y (4 per px): where a pixel came from stays readable."""
    xs = np.arange(width, dtype=np.float32)[None, :].repeat(height, 0)
    ys = np.arange(height, dtype=np.float32)[:, None].repeat(width, 1)
    rgb = np.stack([xs * 2, ys * 4, np.full_like(xs, 128)], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


# Small settings so the test images (40-120 px) spread over several buckets.
SMALL = {"resolution": 64, "min_side": 32, "max_side": 128, "bucket_step": 16}


@pytest.fixture
def tree(tmp_path: Path) -> SimpleNamespace:
    """A dataset with kohya folders, nested folders, missing/bad captions, broken images, and a reg folder."""
    root = tmp_path / "data"
    sks = root / "10_sks circle"
    save_image(sks / "a.png", (64, 64))
    (sks / "a.txt").write_text("sks circle, red, round", encoding="utf-8")
    save_image(sks / "b.png", (64, 96))
    (sks / "b.caption").write_text("tall, blue\n", encoding="utf-8")
    dog = root / "5_ohwx dog"
    save_image(dog / "dog.jpg", (96, 64))
    save_image(dog / "nested" / "deeper" / "deep.WEBP", (40, 120))
    plain = root / "plain"
    save_image(plain / "c.png", (64, 64))
    save_image(plain / "d.jpeg", (64, 64))
    (plain / "d.txt").write_bytes(b"caf\xe9 \xff\xfe")  # Latin-1, not UTF-8
    save_image(plain / "empty.png", (64, 64))
    (plain / "empty.txt").write_text("   \n", encoding="utf-8")
    corrupt = plain / "corrupt.png"
    corrupt.write_bytes(random.Random(1).randbytes(300))
    truncated = plain / "truncated.png"
    save_image(truncated, (64, 64))
    truncated.write_bytes(truncated.read_bytes()[:60])
    tiny = save_image(plain / "tiny.png", (4, 4))
    (plain / "notes.md").write_text("not an image")
    (plain / "data.bin").write_bytes(b"\x00" * 10)
    (root / ".ipynb_checkpoints").mkdir()
    save_image(root / ".ipynb_checkpoints" / "a-checkpoint.png", (64, 64))
    (plain / "._c.png").write_bytes(b"\x00\x05\x16\x07 mac resource fork")
    reg = tmp_path / "reg"
    save_image(reg / "r1.png", (64, 64))
    save_image(reg / "1_person" / "r2.png", (96, 64))
    return SimpleNamespace(
        root=root, reg=reg, corrupt=corrupt, truncated=truncated, tiny=tiny, bad_caption=plain / "d.txt"
    )


def by_name(items) -> dict:
    return {item.path.name: item for item in items}


# ---------------------------------------------------------------- buckets


@pytest.mark.parametrize(
    ("resolution", "min_side", "max_side", "step"),
    [(512, 256, 1024, 64), (1024, 256, 2048, 64), ((768, 512), 256, 1024, 32), (64, 32, 128, 16), (64, 32, 64, 32)],
)
def test_buckets_are_on_the_grid_within_limits_and_maximal(lf, resolution, min_side, max_side, step):
    bz = lf.buckets.Bucketizer(resolution, min_side, max_side, step)
    w0, h0 = (resolution, resolution) if isinstance(resolution, int) else resolution
    area = w0 * h0
    assert bz.area == area
    assert bz.buckets == sorted(set(bz.buckets))

    def fits(w: int, h: int) -> bool:
        return min_side <= w <= max_side and min_side <= h <= max_side and w * h <= area

    square = max(s for s in range(step, max_side + 1, step) if fits(s, s))
    for w, h in bz.buckets:
        assert w % step == 0 and h % step == 0
        assert fits(w, h)
        # Like kohya, the largest square is always a bucket, even where a wider one would still fit.
        if (w, h) != (square, square):
            assert not fits(w + step, h) or not fits(w, h + step), f"{w}x{h} could grow both ways"
    grid = [s for s in range(step, max_side + 1, step) if s >= min_side]
    for side in grid:
        tallest = max((h for h in grid if fits(side, h)), default=None)
        if tallest is not None:
            assert (side, tallest) in bz.buckets and (tallest, side) in bz.buckets
    assert (square, square) in bz.buckets


def test_kohya_sd15_buckets_are_the_familiar_ones(lf):
    buckets = set(lf.buckets.Bucketizer(512, 256, 1024, 64).buckets)
    assert {(512, 512), (448, 576), (576, 448), (384, 640), (320, 768), (256, 1024), (1024, 256)} <= buckets
    assert all(w * h <= 512 * 512 for w, h in buckets)


def test_small_bucket_set_is_exact(lf):
    bz = lf.buckets.Bucketizer(64, min_side=32, max_side=128, step=16)
    assert set(bz.buckets) == {
        (32, 128), (128, 32), (48, 80), (80, 48), (64, 64), (96, 32), (32, 96), (112, 32), (32, 112),
    }  # fmt: skip


@pytest.mark.parametrize(
    ("size", "bucket"),
    [((64, 64), (64, 64)), ((500, 500), (64, 64)), ((64, 96), (48, 80)), ((96, 64), (80, 48)),
     ((40, 120), (32, 96)), ((120, 40), (96, 32)), ((30, 300), (32, 128)), ((1000, 10), (128, 32))],
)  # fmt: skip
def test_assign_picks_the_closest_aspect_ratio(lf, size, bucket):
    bz = lf.buckets.Bucketizer(64, min_side=32, max_side=128, step=16)
    assert bz.assign(*size) == bucket


def test_assign_is_symmetric_and_never_far_from_the_image_aspect(lf):
    bz = lf.buckets.Bucketizer(512, 256, 1024, 64)
    for w, h in [(1024, 768), (1920, 1080), (800, 1200), (333, 777), (4000, 3000)]:
        bw, bh = bz.assign(w, h)
        assert bz.assign(h, w) == (bh, bw)
        best = min(abs(np.log(a / b) - np.log(w / h)) for a, b in bz.buckets)
        assert abs(np.log(bw / bh) - np.log(w / h)) == pytest.approx(best)


def test_assign_ties_go_to_the_larger_bucket(lf):
    bz = lf.buckets.Bucketizer(64, min_side=32, max_side=128, step=16)
    bz.buckets = [(32, 32), (64, 64), (48, 48)]
    assert bz.assign(100, 100) == (64, 64)


def test_non_square_resolution_sets_the_target_area(lf):
    bz = lf.buckets.Bucketizer((96, 64), min_side=32, max_side=192, step=32)
    assert max(w * h for w, h in bz.buckets) <= 96 * 64
    assert bz.assign(96, 64) == (96, 64)
    assert bz.assign(64, 96) == (64, 96)


@pytest.mark.parametrize(
    "kwargs",
    [{"resolution": 0}, {"resolution": (64, -1)}, {"step": 0}, {"min_side": 0}, {"min_side": 200, "max_side": 100}],
)
def test_bucketizer_rejects_bad_settings(lf, kwargs):
    args = {"resolution": 64, "min_side": 32, "max_side": 128, "step": 16, **kwargs}
    with pytest.raises(ValueError):
        lf.buckets.Bucketizer(**args)


def test_bucketizer_without_any_fitting_bucket_says_what_to_change(lf):
    with pytest.raises(ValueError, match="min_side"):
        lf.buckets.Bucketizer(64, min_side=256, max_side=1024, step=64)


def test_no_upscale_keeps_small_images_at_their_own_size(lf):
    bz = lf.buckets.Bucketizer(64, min_side=32, max_side=128, step=16, no_upscale=True)
    assert bz.assign(40, 50) == (32, 48)
    assert bz.assign(48, 80) == (48, 80)
    assert bz.assign(10, 12) == (16, 16)  # never below one step
    assert bz.assign(500, 500) == (64, 64)  # larger than the target area: bucketed as usual
    for w, h in [(40, 50), (33, 95), (63, 63), (20, 200)]:
        bw, bh = bz.assign(w, h)
        assert bw <= w and bh <= h and bw % 16 == 0 and bh % 16 == 0
    normal = lf.buckets.Bucketizer(64, min_side=32, max_side=128, step=16)
    bw, bh = normal.assign(40, 50)
    assert bw > 40 or bh > 50, "without no_upscale the same image is enlarged"


def test_no_upscale_makes_resize_and_crop_only_shrink(lf):
    bz = lf.buckets.Bucketizer(64, min_side=32, max_side=128, step=16, no_upscale=True)
    img = gradient_image(45, 70)
    bucket = bz.assign(*img.size)
    assert bucket == (32, 64)
    new_w, new_h = lf.buckets.cover_size(img.size, bucket)
    assert new_w <= 45 and new_h <= 70
    out, _ = lf.buckets.resize_and_crop(img, bucket)
    assert out.size == bucket


@pytest.mark.parametrize(("size", "bucket"), [((100, 50), (64, 64)), ((50, 100), (48, 80)), ((64, 96), (80, 48))])
def test_resize_keeps_the_aspect_ratio_and_crops_to_the_exact_bucket(lf, size, bucket):
    new_w, new_h = lf.buckets.cover_size(size, bucket)
    assert new_w >= bucket[0] and new_h >= bucket[1]
    assert min(new_w - bucket[0], new_h - bucket[1]) <= 1, "resized further than needed to cover"
    assert new_w / new_h == pytest.approx(size[0] / size[1], rel=2 / min(new_w, new_h))
    out, _ = lf.buckets.resize_and_crop(gradient_image(*size), bucket)
    assert out.size == bucket


def test_crop_is_not_a_squash(lf):
    # 100x50 into 64x64: scaled by 1.28 on both axes to 128x64, then 32 px cut from each side.
    out, corner = lf.buckets.resize_and_crop(gradient_image(100, 50), (64, 64), crop="center")
    assert corner == (0, 32)
    px = np.asarray(out, dtype=np.float32)
    red_slope = np.polyfit(np.arange(10, 54), px[32, 10:54, 0], 1)[0]
    green_slope = np.polyfit(np.arange(10, 54), px[10:54, 32, 1], 1)[0]
    assert red_slope == pytest.approx(2 / 1.28, rel=0.05)
    assert green_slope == pytest.approx(4 / 1.28, rel=0.05)
    # The left edge of the crop is x = 32 / 1.28 = 25 in the source: red 50.
    assert px[32, 0, 0] == pytest.approx(50, abs=4)


def test_center_crop_is_centered_and_random_crop_is_seeded(lf):
    rb = lf.buckets
    img = gradient_image(200, 64)  # already covers 64x64 at scale 1: only cropped
    out, corner = rb.resize_and_crop(img, (64, 64), crop="center")
    assert corner == (0, 68)
    assert out.size == (64, 64)
    corners = set()
    for seed in range(20):
        a, ca = rb.resize_and_crop(img, (64, 64), crop="random", rng=random.Random(seed))
        b, cb = rb.resize_and_crop(img, (64, 64), crop="random", rng=random.Random(seed))
        assert ca == cb and np.array_equal(np.asarray(a), np.asarray(b))
        top, left = ca
        assert top == 0 and 0 <= left <= 200 - 64
        assert np.array_equal(np.asarray(a), np.asarray(img)[:, left : left + 64])
        corners.add(ca)
    assert len(corners) > 5


def test_exact_size_image_is_returned_unchanged(lf):
    img = gradient_image(48, 80)
    out, corner = lf.buckets.resize_and_crop(img, (48, 80), crop="random", rng=random.Random(0))
    assert corner == (0, 0)
    assert np.array_equal(np.asarray(out), np.asarray(img))


def test_resize_and_crop_rejects_unknown_crop_mode(lf):
    with pytest.raises(ValueError, match="crop"):
        lf.buckets.resize_and_crop(gradient_image(64, 64), (64, 64), crop="top")


# ---------------------------------------------------------------- captions


def test_trigger_word_is_prepended_once(lf):
    c = lf.captions
    rng = random.Random(0)
    opts = c.CaptionOptions(trigger_word="ohwx")
    assert c.process_caption("dog, grass", opts, rng) == "ohwx, dog, grass"
    assert c.process_caption("dog, ohwx, grass", opts, rng) == "ohwx, dog, grass"
    assert c.process_caption("OHWX, dog", opts, rng) == "ohwx, dog"
    assert c.process_caption("", opts, rng) == "ohwx"
    assert c.process_caption("  dog ,, ,grass,  ", c.CaptionOptions(), rng) == "dog, grass"


def test_trigger_stays_first_while_shuffling(lf):
    c = lf.captions
    opts = c.CaptionOptions(trigger_word="ohwx", shuffle_tags=True)
    tags = [f"t{i}" for i in range(12)]
    seen = set()
    for seed in range(20):
        out = c.process_caption(", ".join(tags), opts, random.Random(seed)).split(", ")
        assert out[0] == "ohwx" and sorted(out[1:]) == sorted(tags)
        seen.add(tuple(out))
    assert len(seen) > 10


def test_keep_tokens_stay_in_front_while_the_rest_shuffles(lf):
    c = lf.captions
    text = "sks, woman, a, b, c, d, e, f, g"
    opts = c.CaptionOptions(shuffle_tags=True, keep_tokens=2)
    orders = set()
    for seed in range(20):
        out = c.process_caption(text, opts, random.Random(seed)).split(", ")
        assert out[:2] == ["sks", "woman"]
        assert sorted(out[2:]) == list("abcdefg")
        orders.add(tuple(out))
    assert len(orders) > 10
    # keep_tokens counts the trigger: with the trigger added, keep_tokens=2 keeps it and one caption tag.
    opts = c.CaptionOptions(trigger_word="ohwx", shuffle_tags=True, keep_tokens=2)
    for seed in range(10):
        out = c.process_caption("woman, a, b, c", opts, random.Random(seed)).split(", ")
        assert out[:2] == ["ohwx", "woman"]


def test_processing_is_deterministic_given_the_rng(lf):
    c = lf.captions
    opts = c.CaptionOptions(trigger_word="ohwx", shuffle_tags=True, tag_dropout=0.3, caption_dropout=0.2)
    text = ", ".join(f"tag{i}" for i in range(15))
    first = [c.process_caption(text, opts, random.Random(s)) for s in range(30)]
    again = [c.process_caption(text, opts, random.Random(s)) for s in range(30)]
    assert first == again
    rng_a, rng_b = random.Random(5), random.Random(5)
    assert [c.process_caption(text, opts, rng_a) for _ in range(10)] == [
        c.process_caption(text, opts, rng_b) for _ in range(10)
    ]


def test_tag_dropout_drops_only_unkept_tags(lf):
    c = lf.captions
    tags = [f"t{i}" for i in range(20)]
    opts = c.CaptionOptions(trigger_word="ohwx", keep_tokens=2, tag_dropout=0.5)
    kept_counts = []
    for seed in range(50):
        out = c.process_caption(", ".join(tags), opts, random.Random(seed)).split(", ")
        assert out[:2] == ["ohwx", "t0"]
        assert set(out[2:]) <= set(tags[1:])
        assert out[2:] == [t for t in tags[1:] if t in out[2:]], "without shuffle the order is kept"
        kept_counts.append(len(out) - 2)
    assert 5 < np.mean(kept_counts) < 14  # about half of 19
    everything = c.CaptionOptions(keep_tokens=1, tag_dropout=1.0)
    assert c.process_caption("a, b, c", everything, random.Random(0)) == "a"


def test_caption_dropout_empties_the_whole_caption(lf):
    c = lf.captions
    opts = c.CaptionOptions(trigger_word="ohwx", prefix="photo", caption_dropout=0.3)
    outs = [c.process_caption("dog, grass", opts, random.Random(seed)) for seed in range(200)]
    dropped = outs.count("")
    assert 30 < dropped < 90
    assert set(outs) == {"", "photo, ohwx, dog, grass"}
    always = c.CaptionOptions(caption_dropout=1.0)
    assert c.process_caption("dog", always, random.Random(0)) == ""


def test_prefix_and_suffix_wrap_the_caption(lf):
    c = lf.captions
    opts = c.CaptionOptions(trigger_word="ohwx", prefix="masterpiece, ", suffix="best quality", shuffle_tags=True)
    for seed in range(10):
        out = c.process_caption("a, b, c", opts, random.Random(seed)).split(", ")
        assert out[0] == "masterpiece" and out[1] == "ohwx" and out[-1] == "best quality"
    custom = c.CaptionOptions(prefix="pre", suffix="post", separator=" | ")
    assert c.process_caption("a, b", custom, random.Random(0)) == "pre | a | b | post"
    assert c.process_caption("", custom, random.Random(0)) == "pre | post"


@pytest.mark.parametrize("kwargs", [{"caption_dropout": 1.5}, {"tag_dropout": -0.1}, {"keep_tokens": -1}])
def test_caption_options_reject_bad_values(lf, kwargs):
    with pytest.raises(ValueError):
        lf.captions.CaptionOptions(**kwargs)


def test_tag_frequency_counts_tags_per_folder(lf):
    freq = lf.captions.tag_frequency(
        {"10_sks circle": ["sks circle, red", "sks circle, blue, red", ""], "plain": ["a,  b", "b"], "none": []}
    )
    assert freq == {
        "10_sks circle": {"sks circle": 2, "red": 2, "blue": 1},
        "plain": {"a": 1, "b": 2},
        "none": {},
    }


# ---------------------------------------------------------------- dataset scanning


def test_load_dataset_finds_images_repeats_and_captions(lf, tree):
    ds = lf.dataset.load_dataset(tree.root, **SMALL)
    items = by_name(ds.items)
    assert set(items) == {"a.png", "b.png", "dog.jpg", "deep.WEBP", "c.png", "d.jpeg", "empty.png"}
    assert ds.root == tree.root.resolve()
    assert ds.validation == []
    a, b, dog, deep = items["a.png"], items["b.png"], items["dog.jpg"], items["deep.WEBP"]
    assert (a.repeats, a.folder, a.caption) == (10, "10_sks circle", "sks circle, red, round")
    assert (b.repeats, b.caption) == (10, "tall, blue")  # from the second caption extension
    assert (dog.repeats, dog.caption) == (5, "ohwx dog")  # no caption file: the folder's tokens
    assert (deep.repeats, deep.caption, deep.folder) == (5, "ohwx dog", "5_ohwx dog/nested/deeper")
    assert items["c.png"].repeats == 1 and items["c.png"].caption == ""
    assert items["empty.png"].caption == ""
    assert items["d.jpeg"].caption == ""  # unreadable caption file: image kept, fallback caption
    for item in ds.items:
        assert item.path.is_absolute() and item.path.is_file()
        assert not item.is_reg and item.loss_weight == 1.0
    assert (a.size, a.bucket) == ((64, 64), (64, 64))
    assert (b.size, b.bucket) == ((64, 96), (48, 80))
    assert (dog.size, dog.bucket) == ((96, 64), (80, 48))
    assert (deep.size, deep.bucket) == ((40, 120), (32, 96))


def test_report_counts_and_skip_reasons(lf, tree):
    ds = lf.dataset.load_dataset(tree.root, **SMALL)
    r = ds.report
    assert r.images_per_folder == {"10_sks circle": 2, "5_ohwx dog": 1, "5_ohwx dog/nested/deeper": 1, "plain": 3}
    assert r.repeats_per_folder == {"10_sks circle": 10, "5_ohwx dog": 5, "5_ohwx dog/nested/deeper": 5, "plain": 1}
    assert r.buckets == {(32, 96): 1, (48, 80): 1, (64, 64): 4, (80, 48): 1}
    assert (r.captions_found, r.captions_from_folder, r.captions_missing) == (2, 2, 3)
    assert (r.train_count, r.validation_count, r.reg_count) == (7, 0, 0)
    assert r.samples_per_epoch == 10 * 2 + 5 * 2 + 3
    skipped = dict(r.skipped)
    assert set(skipped) == {tree.corrupt, tree.truncated, tree.tiny}
    assert "not a readable image" in skipped[tree.corrupt]
    assert "not a readable image" in skipped[tree.truncated]
    assert "too small" in skipped[tree.tiny] and "4x4" in skipped[tree.tiny]
    assert [p for p, _ in r.caption_errors] == [tree.bad_caption]
    assert "UTF-8" in r.caption_errors[0][1]


def test_summary_lists_everything_a_user_needs(lf, tree):
    ds = lf.dataset.load_dataset(tree.root, reg_folder=tree.reg, validation_split=0.2, **SMALL)
    text = ds.report.summary()
    assert str(tree.root.resolve()) in text
    for path, reason in ds.report.skipped:
        assert f"{path}: {reason}" in text
    assert str(tree.bad_caption) in text
    assert "10_sks circle: 2 image(s) x 10 repeat(s)" in text
    assert "reg: 1_person: 1 image(s) x 1 repeat(s)" in text
    assert "64x64:" in text and "32x96: 1" in text
    assert "2 from caption files, 3 from folder names, 4 missing" in text  # reg captions included
    assert f"{ds.report.validation_count} for validation" in text and "2 regularisation" in text
    assert len(text.splitlines()) > 10


def test_min_image_side_is_configurable(lf, tree):
    ds = lf.dataset.load_dataset(tree.root, min_image_side=50, **SMALL)
    names = by_name(ds.items)
    assert "deep.WEBP" not in names and "a.png" in names
    reasons = {p.name: r for p, r in ds.report.skipped}
    assert "40x120" in reasons["deep.WEBP"] and "50" in reasons["deep.WEBP"]


def test_custom_caption_extensions_and_default_repeats(lf, tree):
    ds = lf.dataset.load_dataset(tree.root, caption_extensions=("caption",), default_repeats=3, **SMALL)
    items = by_name(ds.items)
    assert items["a.png"].caption == "sks circle"  # a.txt is not looked at: folder tokens
    assert items["b.png"].caption == "tall, blue"
    assert items["c.png"].repeats == 3 and items["a.png"].repeats == 10
    assert ds.report.caption_errors == []


def test_root_folder_itself_may_carry_the_repeats(lf, tmp_path):
    root = tmp_path / "3_zxc cat"
    save_image(root / "x.png", (64, 64))
    save_image(root / "sub" / "y.png", (64, 64))
    ds = lf.dataset.load_dataset(root, **SMALL)
    items = by_name(ds.items)
    assert {i.repeats for i in ds.items} == {3}
    assert {i.caption for i in ds.items} == {"zxc cat"}
    assert items["x.png"].folder == "." and items["y.png"].folder == "sub"


def test_exif_rotated_photo_is_measured_upright(lf, tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    save_image(tmp_path / "d" / "phone.jpg", (96, 64), exif=exif)
    ds = lf.dataset.load_dataset(tmp_path / "d", **SMALL)
    (item,) = ds.items
    assert item.size == (64, 96) and item.bucket == (48, 80)
    assert ds.load_image(item).shape == (80, 48, 3)


def test_transparent_pixels_become_white(lf, tmp_path):
    path = tmp_path / "d" / "alpha.png"
    path.parent.mkdir()
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(path)
    ds = lf.dataset.load_dataset(tmp_path / "d", **SMALL)
    assert torch.all(ds.load_image(ds.items[0]) == 1.0)


# ---------------------------------------------------------------- regularisation and validation


def test_reg_folder_items_are_flagged_with_the_prior_weight(lf, tree):
    ds = lf.dataset.load_dataset(tree.root, reg_folder=tree.reg, prior_loss_weight=0.5, **SMALL)
    reg = [i for i in ds.items if i.is_reg]
    assert {i.path.name for i in reg} == {"r1.png", "r2.png"}
    assert all(i.loss_weight == 0.5 for i in reg)
    assert all(i.loss_weight == 1.0 for i in ds.items if not i.is_reg)
    assert by_name(reg)["r2.png"].repeats == 1 and by_name(reg)["r2.png"].bucket == (80, 48)
    assert ds.report.reg_count == 2 and ds.report.train_count == 7
    assert ds.report.images_per_folder["reg: ."] == 1


def test_blank_reg_folder_means_none(lf, tree):
    ds = lf.dataset.load_dataset(tree.root, reg_folder="  ", **SMALL)
    assert ds.report.reg_count == 0 and not any(i.is_reg for i in ds.items)


def test_reg_folder_inside_the_dataset_is_not_trained_twice(lf, tree):
    inner = tree.root / "reg"
    save_image(inner / "r.png", (64, 64))
    ds = lf.dataset.load_dataset(tree.root, reg_folder=inner, **SMALL)
    matches = [i for i in ds.items if i.path.name == "r.png"]
    assert len(matches) == 1 and matches[0].is_reg


def test_validation_split_is_deterministic_and_disjoint(lf, tmp_path):
    root = tmp_path / "many"
    for i in range(20):
        save_image(root / f"{i:02d}.png", (64, 64) if i % 2 else (96, 64))
    save_image(tmp_path / "reg" / "r.png", (64, 64))
    load = lf.dataset.load_dataset

    def held_out(seed: int) -> list[str]:
        ds = load(root, validation_split=0.25, seed=seed, reg_folder=tmp_path / "reg", **SMALL)
        val = {i.path for i in ds.validation}
        assert not val & {i.path for i in ds.items}
        assert len(ds.validation) == 5 and len(ds.items) == 16
        assert not any(i.is_reg for i in ds.validation)
        assert ds.report.validation_count == 5 and ds.report.train_count == 15
        return sorted(p.name for p in val)

    assert held_out(0) == held_out(0)
    assert len({tuple(held_out(seed)) for seed in range(5)}) > 1
    assert load(root, validation_split=0.0, **SMALL).validation == []


def test_validation_split_holds_out_at_least_one_but_never_all(lf, tmp_path):
    root = tmp_path / "few"
    save_image(root / "a.png", (64, 64))
    load = lf.dataset.load_dataset
    assert load(root, validation_split=0.5, **SMALL).validation == []  # a single image is all there is to train on
    save_image(root / "b.png", (64, 64))
    ds = load(root, validation_split=0.01, **SMALL)
    assert len(ds.validation) == 1 and len(ds.items) == 1
    ds = load(root, validation_split=0.99, **SMALL)
    assert len(ds.validation) == 1 and len(ds.items) == 1


# ---------------------------------------------------------------- epoch order


def test_epoch_order_repeats_each_item_and_keeps_buckets_apart(lf, tree):
    ds = lf.dataset.load_dataset(tree.root, reg_folder=tree.reg, **SMALL)
    batches = ds.epoch_order(epoch=0, seed=1, batch_size=3)
    flat = [i for batch in batches for i in batch]
    assert sorted(flat) == sorted(i for i, item in enumerate(ds.items) for _ in range(item.repeats))
    for batch in batches:
        assert 1 <= len(batch) <= 3
        assert len({ds.items[i].bucket for i in batch}) == 1
    per_bucket = {}
    for batch in batches:
        per_bucket.setdefault(ds.items[batch[0]].bucket, []).append(len(batch))
    for sizes in per_bucket.values():
        assert sizes.count(3) >= len(sizes) - 1, "only one partial batch per bucket"


def test_epoch_order_is_seeded_and_changes_between_epochs(lf, tree):
    ds = lf.dataset.load_dataset(tree.root, **SMALL)
    assert ds.epoch_order(0, 42, 2) == ds.epoch_order(0, 42, 2)
    assert ds.epoch_order(1, 42, 2) != ds.epoch_order(0, 42, 2)
    assert ds.epoch_order(0, 43, 2) != ds.epoch_order(0, 42, 2)
    singles = ds.epoch_order(3, 0, 1)
    assert all(len(b) == 1 for b in singles) and len(singles) == ds.report.samples_per_epoch
    with pytest.raises(lf.dataset.DatasetError, match="batch_size"):
        ds.epoch_order(0, 0, 0)


# ---------------------------------------------------------------- loading images


def test_load_image_returns_a_bucket_sized_comfy_image(lf, tree):
    ds = lf.dataset.load_dataset(tree.root, **SMALL)
    for item in ds.items:
        img = ds.load_image(item, crop="center", flip=False, rng=random.Random(0))
        bw, bh = item.bucket
        assert img.shape == (bh, bw, 3) and img.dtype == torch.float32
        assert 0.0 <= img.min() and img.max() <= 1.0
    red = ds.load_image(by_name(ds.items)["a.png"])
    assert torch.allclose(red[0, 0], torch.tensor([200, 40, 40]) / 255.0)


def test_load_image_flips_and_crops_like_resize_and_crop(lf, tmp_path):
    root = tmp_path / "g"
    root.mkdir()
    gradient_image(200, 64).save(root / "wide.png")
    ds = lf.dataset.load_dataset(root, **SMALL)
    (item,) = ds.items
    assert item.bucket == (96, 32)
    plain = ds.load_image(item)
    flipped = ds.load_image(item, flip=True)
    assert torch.equal(flipped, plain.flip(1))
    expected, _ = lf.buckets.resize_and_crop(gradient_image(200, 64), item.bucket, "random", random.Random(7))
    got = ds.load_image(item, crop="random", rng=random.Random(7))
    assert torch.allclose(got, torch.from_numpy(np.asarray(expected, dtype=np.float32) / 255.0))
    tensor, corner = lf.dataset.load_item_image(item, "random", False, random.Random(7))
    assert torch.equal(tensor, got) and corner[0] == 0


def test_load_image_of_a_file_gone_bad_names_it(lf, tmp_path):
    root = tmp_path / "g"
    path = save_image(root / "x.png", (64, 64))
    ds = lf.dataset.load_dataset(root, **SMALL)
    path.write_bytes(b"garbage")
    with pytest.raises(lf.dataset.DatasetError, match="x.png"):
        ds.load_image(ds.items[0])


def test_dataset_tag_frequency_uses_folder_names(lf, tree):
    ds = lf.dataset.load_dataset(tree.root, reg_folder=tree.reg, **SMALL)
    freq = ds.tag_frequency()
    assert freq["10_sks circle"] == {"sks circle": 1, "red": 1, "round": 1, "tall": 1, "blue": 1}
    assert freq["5_ohwx dog"] == {"ohwx dog": 1}
    assert "1_person" not in freq


# ---------------------------------------------------------------- errors


def test_missing_folder_is_a_clear_error(lf, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(lf.dataset.DatasetError, match="nope") as info:
        lf.dataset.load_dataset(missing, **SMALL)
    assert isinstance(info.value, ValueError)
    assert ".png/.jpg/.webp" in str(info.value)
    with pytest.raises(lf.dataset.DatasetError, match="folder"):
        lf.dataset.load_dataset("", **SMALL)


def test_folder_without_usable_images_is_a_clear_error(lf, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("hello")
    with pytest.raises(lf.dataset.DatasetError, match="put .png/.jpg/.webp images in") as info:
        lf.dataset.load_dataset(empty, **SMALL)
    assert str(empty.resolve()) in str(info.value)
    (empty / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(lf.dataset.DatasetError, match="no usable image") as info:
        lf.dataset.load_dataset(empty, **SMALL)
    assert "broken.jpg: not a readable image" in str(info.value), "the error says why each file was skipped"


def test_reg_folder_errors_name_the_reg_folder(lf, tree, tmp_path):
    with pytest.raises(lf.dataset.DatasetError, match="reg_folder"):
        lf.dataset.load_dataset(tree.root, reg_folder=tmp_path / "no-reg", **SMALL)
    (tmp_path / "empty-reg").mkdir()
    with pytest.raises(lf.dataset.DatasetError, match="reg_folder .*empty-reg"):
        lf.dataset.load_dataset(tree.root, reg_folder=tmp_path / "empty-reg", **SMALL)
    with pytest.raises(lf.dataset.DatasetError, match="reg_folder"):
        lf.dataset.load_dataset(tree.root, reg_folder=tree.root, **SMALL)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"resolution": 0}, "resolution"),
        ({"resolution": -512}, "resolution"),
        ({"resolution": (64, 0)}, "resolution"),
        ({"resolution": 64.5}, "resolution"),
        ({"min_side": 0}, "min_side"),
        ({"max_side": -1}, "max_side"),
        ({"max_side": 16}, "max_side"),
        ({"bucket_step": 0}, "bucket_step"),
        ({"min_image_side": 0}, "min_image_side"),
        ({"default_repeats": 0}, "default_repeats"),
        ({"validation_split": 1.0}, "validation_split"),
        ({"validation_split": -0.1}, "validation_split"),
        ({"prior_loss_weight": -1.0}, "prior_loss_weight"),
        ({"min_side": 256}, "min_side"),
    ],
)
def test_bad_settings_name_the_field(lf, tree, kwargs, field):
    with pytest.raises(lf.dataset.DatasetError, match=field):
        lf.dataset.load_dataset(tree.root, **{**SMALL, **kwargs})


def test_non_square_resolution_and_os_pathlike(lf, tree):
    ds = lf.dataset.load_dataset(os.fspath(tree.root), **{**SMALL, "resolution": (64, 32), "min_side": 16})
    assert all(w * h <= 64 * 32 for w, h in ds.report.buckets)
