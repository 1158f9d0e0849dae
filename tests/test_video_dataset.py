"""Video clips and frame folders in Load Dataset, and edit-model control images: real files built at test time.

Every frame of a test clip is flat grey whose level encodes its index (5 * i in the left half, 250 in the right),
so the frames a sample holds, their order and their mirroring can be read back after a lossy codec.
"""

from __future__ import annotations

import random
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import av
import numpy as np
import pytest
from PIL import Image

SMALL = {"resolution": 64, "min_side": 32, "max_side": 128, "bucket_step": 16}
STEP = 5  # grey level per frame index
RIGHT = 250  # the right half of every frame, so a mirrored frame is told apart
WIDE, TALL = (80, 48), (48, 80)  # the buckets of 64x48 and 48x64 under SMALL
WEBM = "libvpx" in av.codecs_available


@pytest.fixture(scope="module")
def lf(pack) -> SimpleNamespace:
    from lora_foundry.training.data import dataset, dataset_options, images, latent_cache, video
    return SimpleNamespace(dataset=dataset, video=video, options=dataset_options, cache=latent_cache, images=images)


def frame_array(index: int, size: tuple[int, int]) -> np.ndarray:
    width, height = size
    array = np.full((height, width, 3), RIGHT, np.uint8)
    array[:, : width // 2] = STEP * index
    return array


def write_video(path: Path, count: int, size=(64, 48), fps: int = 24) -> Path:
    """A clip whose frame i is grey 5 * i on the left half; mp4 with mpeg4, webm with libvpx, both near lossless."""
    path.parent.mkdir(parents=True, exist_ok=True)
    codec = "libvpx" if path.suffix == ".webm" else "mpeg4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        if codec == "libvpx":
            stream.options = {"crf": "4", "b:v": "2M"}
        else:
            stream.bit_rate = 20_000_000
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(frame_array(index, size), format="rgb24")
            out.mux(stream.encode(frame))
        out.mux(stream.encode())
    return path


def save_image(path: Path, size=(64, 64), color=(200, 40, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def frame_codes(clip) -> list[int]:
    """The frame index each frame of a [T, H, W, 3] tensor shows (its left edge's grey level / STEP)."""
    left = clip[:, :, :4].mean(dim=(1, 2, 3)).numpy() * 255
    codes = np.round(left / STEP).astype(int).tolist()
    assert np.allclose(left, np.array(codes) * STEP, atol=2), left
    return codes


def reasons(dataset) -> dict[str, str]:
    return {path.name: reason for path, reason in dataset.report.skipped}


# ---------------------------------------------------------------- which frames


def test_head_takes_the_first_frames_or_the_longest_fitting_count(lf):
    fi = lf.video.frame_indices
    assert fi(48, 24, 17, "head", 4) == [tuple(range(17))]
    assert fi(10, 24, 17, "head", 4) == [tuple(range(9))]  # 10 frames: 9 = 2 * 4 + 1 fit
    assert fi(3, 24, 17, "head", 4) == [(0,)]
    assert fi(20, 24, 17, "head", 8) == [tuple(range(17))]
    assert fi(0, 24, 17, "head", 4) == []


def test_uniform_spreads_over_the_whole_clip_first_and_last_included(lf):
    fi = lf.video.frame_indices
    assert fi(48, 24, 17, "uniform", 4) == [(0, 3, 6, 9, 12, 15, 18, 21, 24, 26, 29, 32, 35, 38, 41, 44, 47)]
    assert fi(11, 24, 17, "uniform", 4) == [(0, 1, 2, 4, 5, 6, 8, 9, 10)]  # 11 frames: 9 of them
    assert fi(48, 24, 1, "uniform", 4) == [(0,)]


def test_chunk_gives_consecutive_windows_and_a_short_clip_one_head(lf):
    fi = lf.video.frame_indices
    assert fi(48, 24, 17, "chunk", 4) == [tuple(range(17)), tuple(range(17, 34))]
    assert fi(34, 24, 17, "chunk", 4) == [tuple(range(17)), tuple(range(17, 34))]
    assert fi(33, 24, 17, "chunk", 4) == [tuple(range(17))]
    assert fi(12, 24, 17, "chunk", 4) == [tuple(range(9))]
    assert fi(5, 24, 1, "chunk", 4) == [(0,), (1,), (2,), (3,), (4,)]


def test_frame_rate_resamples_before_taking_frames(lf):
    fi = lf.video.frame_indices
    # 24 fps to 16: output frame j is source round(1.5 j), halves up.
    assert lf.video.resampled(10, 24, 16) == [0, 2, 3, 5, 6, 8, 9]
    assert len(lf.video.resampled(48, 24, 16)) == 32
    assert fi(48, 24, 17, "head", 4, 16) == [(0, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18, 20, 21, 23, 24)]
    assert fi(48, 24, 9, "chunk", 4, 12) == [tuple(range(0, 18, 2)), tuple(range(18, 36, 2))]
    assert fi(48, 24, 5, "uniform", 4, 12) == [(0, 12, 24, 34, 46)]  # resampled 0, 2, ..., 46: positions 0 6 12 17 23
    assert fi(4, 24, 5, "head", 4, 48) == [(0, 1, 1, 2, 2)]  # a higher rate repeats frames
    assert fi(48, 24, 17, "head", 4, 0) == fi(48, 24, 17, "head", 4)


def test_frames_that_do_not_fit_the_multiple_are_refused_with_the_nearest_counts(lf, tmp_path):
    with pytest.raises(lf.video.VideoError, match=r"^frames 16 does not fit frame_multiple 4: use 13 or 17$"):
        lf.video.frame_indices(48, 24, 16, "head", 4)
    with pytest.raises(lf.video.VideoError, match="frames 20 does not fit frame_multiple 8: use 17 or 25"):
        lf.video.frame_indices(48, 24, 20, "chunk", 8)
    with pytest.raises(lf.video.VideoError, match="frame_extraction 'middle' is not one of head, uniform, chunk"):
        lf.video.frame_indices(48, 24, 17, "middle", 4)
    save_image(tmp_path / "d" / "a.png")
    with pytest.raises(lf.dataset.DatasetError, match="frames 16 does not fit frame_multiple 4: use 13 or 17"):
        lf.dataset.load_dataset(tmp_path / "d", frames=16, **SMALL)
    with pytest.raises(lf.dataset.DatasetError, match="frame_extraction must be one of head, uniform, chunk"):
        lf.dataset.load_dataset(tmp_path / "d", frame_extraction="all", **SMALL)


# ---------------------------------------------------------------- a mixed dataset


@pytest.fixture(scope="module")
def mixed(lf, tmp_path_factory) -> SimpleNamespace:
    """Two videos, a frame folder with its caption, two still images, a corrupt and an empty video."""
    root = tmp_path_factory.mktemp("mixed") / "data"
    walk = write_video(root / "walk.mp4", 48)
    (root / "walk.txt").write_text("a person walking", encoding="utf-8")
    run = write_video(root / "10_sks run" / ("run.webm" if WEBM else "run.mp4"), 24, size=(48, 64))
    spin = root / "spin"
    spin.mkdir()
    for number in range(1, 11):  # 1.png .. 10.png: numeric order, not 1, 10, 2, ...
        Image.fromarray(frame_array(number, (64, 48))).save(spin / f"{number}.png")
    (root / "spin.txt").write_text("a spinning top", encoding="utf-8")
    save_image(root / "a.png", (64, 64))
    (root / "a.txt").write_text("a still", encoding="utf-8")
    save_image(root / "b.png", (64, 48))
    (root / "bad.mp4").write_bytes(random.Random(3).randbytes(2000))
    (root / "empty.webm").touch()
    dataset = lf.dataset.load_dataset(root, frames=17, frame_extraction="chunk", **SMALL)
    return SimpleNamespace(root=root, walk=walk, run=run, spin=spin, dataset=dataset)


def test_probe_reads_size_count_and_rate(lf, mixed):
    assert lf.video.probe(mixed.walk) == lf.video.ClipInfo(64, 48, 48, 24.0)
    assert lf.video.probe(mixed.run) == lf.video.ClipInfo(48, 64, 24, 24.0)  # webm: counted from its packets
    assert lf.video.probe_frame_folder(mixed.spin) == lf.video.ClipInfo(64, 48, 10, 16.0)
    assert lf.video.probe_frame_folder(mixed.spin, 8.0).fps == 8.0


def test_videos_frame_folders_and_images_become_items(lf, mixed):
    ds = mixed.dataset
    got = [(i.path.relative_to(mixed.root).as_posix(), i.frames[:1] + i.frames[-1:], i.frame_count, i.bucket,
            i.caption, i.repeats, i.is_clip) for i in ds.items]
    run = mixed.run.relative_to(mixed.root).as_posix()
    assert sorted(got) == sorted([
        (run, (0, 16), 17, TALL, "sks run", 10, True),
        ("a.png", (), 1, (64, 64), "a still", 1, False),
        ("b.png", (), 1, WIDE, "", 1, False),
        ("spin", (0, 8), 9, WIDE, "a spinning top", 1, True),
        ("walk.mp4", (0, 16), 17, WIDE, "a person walking", 1, True),
        ("walk.mp4", (17, 33), 17, WIDE, "a person walking", 1, True),
    ])
    assert all(item.frames == tuple(range(item.frames[0], item.frames[0] + item.frame_count))
               for item in ds.items if item.is_clip)
    assert not any(item.path.parent == mixed.spin for item in ds.items)  # its frames are not images of their own
    report = ds.report
    assert (report.train_count, report.clip_samples, len(report.clips)) == (6, 4, 3)
    assert report.frame_buckets == {(TALL, 17): 1, ((64, 64), 1): 1, (WIDE, 1): 1, (WIDE, 9): 1, (WIDE, 17): 2}
    assert (report.captions_found, report.captions_from_folder, report.captions_missing) == (3, 1, 1)
    assert report.shared_captions == []  # the two samples of walk.mp4 are one file


def test_the_report_lists_clips_buckets_and_skipped_videos(lf, mixed):
    summary = mixed.dataset.report.summary()
    name = mixed.run.relative_to(mixed.root).as_posix()
    assert ("Samples: 6 for training, 0 for validation, 0 regularisation (4 from 3 clip(s), 2 still image(s)); "
            "15 samples per epoch with repeats") in summary
    assert "  .: 2 image(s), 2 clip(s) x 1 repeat(s)" in summary
    assert "  10_sks run: 0 image(s), 1 clip(s) x 10 repeat(s)" in summary
    assert "Clips (3):" in summary
    assert f"  {name}: 24 frames at 24 fps -> 1 sample of 17 frames, 48x80" in summary
    assert "  spin: 10 frames at 16 fps -> 1 sample of 9 frames, 80x48" in summary
    assert "  walk.mp4: 48 frames at 24 fps -> 2 samples of 17 frames, 80x48" in summary
    assert "  80x48 x 17 frames: 2" in summary and "  80x48 x 9 frames: 1" in summary and "  80x48: 1" in summary
    why = reasons(mixed.dataset)
    assert set(why) == {"bad.mp4", "empty.webm"}
    assert why["bad.mp4"].startswith("not a readable video (")
    assert why["empty.webm"].startswith("empty file (0 bytes)")
    assert f"  {mixed.root / 'bad.mp4'}: not a readable video (" in summary


def test_epoch_batches_never_mix_frame_counts_or_buckets(lf, mixed):
    ds = mixed.dataset
    for seed, batch_size in ((0, 2), (1, 3), (5, 16)):
        batches = ds.epoch_order(0, seed, batch_size)
        assert sorted(i for b in batches for i in b) == sorted(i for i, it in enumerate(ds.items)
                                                              for _ in range(it.repeats))
        for batch in batches:
            assert len({(ds.items[i].bucket, ds.items[i].frame_count, ds.items[i].is_clip) for i in batch}) == 1


def test_a_clip_loads_as_its_frames_cut_alike_and_flip_mirrors_each(lf, mixed):
    ds = mixed.dataset
    second = next(i for i in ds.items if i.path == mixed.walk and i.frames[0] == 17)
    clip = ds.load_image(second)
    assert clip.shape == (17, 48, 80, 3) and clip.dtype.is_floating_point
    assert frame_codes(clip) == list(range(17, 34))
    assert np.allclose(clip[:, :, -4:].numpy() * 255, RIGHT, atol=3)
    flipped = ds.load_image(second, flip=True)
    assert frame_codes(flipped.flip(2)) == list(range(17, 34))
    assert np.allclose(flipped[:, :, :4].numpy() * 255, RIGHT, atol=3)
    tensor, corner = lf.dataset.load_item_image(second, "random", False, random.Random(1))
    assert tensor.shape == (17, 48, 80, 3) and frame_codes(tensor) == list(range(17, 34))
    assert corner[1] == 0  # 64x48 covers 80x48 at 80x60: only the height is cropped


def test_frame_folders_and_resampled_videos_load_the_right_frames(lf, mixed):
    ds = mixed.dataset
    spin = next(i for i in ds.items if i.path == mixed.spin)
    assert frame_codes(ds.load_image(spin)) == list(range(1, 10))  # files 1.png .. 9.png
    run = next(i for i in ds.items if i.path == mixed.run)
    assert ds.load_image(run).shape == (17, 80, 48, 3)
    uniform = lf.dataset.load_dataset(mixed.root, frames=9, frame_extraction="uniform", frame_rate=12, **SMALL)
    walk = next(i for i in uniform.items if i.path == mixed.walk)
    expected = [2 * round(p) for p in np.linspace(0, 23, 9)]  # 12 fps keeps every second frame: 0, 2, ..., 46
    assert walk.frames == tuple(expected)
    assert frame_codes(uniform.load_image(walk)) == expected
    assert "  walk.mp4: 48 frames at 24 fps (24 at 12 fps) -> 1 sample of 9 frames, 80x48" in uniform.report.summary()


def test_a_video_over_the_pixel_limit_or_too_small_is_skipped(lf, tmp_path, monkeypatch):
    write_video(tmp_path / "d" / "clip.mp4", 5, size=(64, 48))
    save_image(tmp_path / "d" / "small.png", (32, 32))
    save_image(tmp_path / "d" / "large.png", (100, 100))
    monkeypatch.setattr(lf.images, "MAX_IMAGE_PIXELS", 2000)
    dataset = lf.dataset.load_dataset(tmp_path / "d", **SMALL)
    assert [i.path.name for i in dataset.items] == ["small.png"]
    assert reasons(dataset)["clip.mp4"] == "too large: 64x48 (0.00307 megapixels, the limit is 0.002); downscale it"
    monkeypatch.undo()
    dataset = lf.dataset.load_dataset(tmp_path / "d", min_image_side=50, **SMALL)
    assert [i.path.name for i in dataset.items] == ["large.png"]
    assert reasons(dataset)["clip.mp4"] == "too small: 64x48 px, both sides must be at least 50 px"


def test_digit_named_images_without_a_folder_caption_stay_images(lf, tmp_path):
    for number in range(1, 4):
        save_image(tmp_path / "d" / "shots" / f"{number:04d}.png")
    dataset = lf.dataset.load_dataset(tmp_path / "d", **SMALL)
    assert [(i.path.name, i.is_clip) for i in dataset.items] == [(f"{n:04d}.png", False) for n in range(1, 4)]


def test_masks_on_list_clips_as_unmasked_and_validation_keeps_a_clip_whole(lf, mixed):
    dataset = lf.dataset.load_dataset(mixed.root, frame_extraction="chunk", alpha_mask=True, **SMALL)
    assert mixed.walk in dataset.report.masks_missing
    assert f"  no mask: {mixed.walk}" in dataset.report.summary()
    assert all(item.mask is None for item in dataset.items if item.is_clip)
    for seed in range(6):
        split = lf.dataset.load_dataset(mixed.root, frame_extraction="chunk", validation_split=0.4, seed=seed, **SMALL)
        held = {item.path for item in split.validation}
        assert len(held) == 2 and not held & {item.path for item in split.items}


def test_latent_cache_keys_tell_clip_samples_apart_and_keep_still_keys(lf, mixed):
    import hashlib

    cache = lf.cache.LatentCache("vae")
    ds = mixed.dataset
    first, second = (i for i in ds.items if i.path == mixed.walk)
    assert cache.path(first, False) != cache.path(second, False)
    still = next(i for i in ds.items if i.path.name == "a.png")
    stat = still.path.stat()
    key = f"vae|a.png|{stat.st_size}|{stat.st_mtime_ns}|{still.bucket}|False|center"
    assert cache.path(still, False).name == f"a-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


# ---------------------------------------------------------------- still images keep their order


def test_still_image_epoch_order_is_what_grouping_by_bucket_gave(lf, tmp_path):
    root = tmp_path / "d"
    sizes = [(64, 64), (64, 48), (48, 64), (128, 32), (64, 64), (64, 48), (96, 64), (64, 64), (32, 128)]
    for n, size in enumerate(sizes):
        save_image(root / (f"{n % 3 + 1}_x" if n % 2 else "plain") / f"{n}.png", size)
    ds = lf.dataset.load_dataset(root, **SMALL)

    def by_bucket_only(epoch: int, seed: int, batch_size: int) -> list[list[int]]:
        rng = random.Random(f"{seed}/{epoch}")
        groups = defaultdict(list)
        for index, item in enumerate(ds.items):
            groups[item.bucket].extend([index] * item.repeats)
        batches = []
        for bucket in sorted(groups):
            rng.shuffle(groups[bucket])
            batches.extend(groups[bucket][i : i + batch_size] for i in range(0, len(groups[bucket]), batch_size))
        rng.shuffle(batches)
        return batches

    assert len(ds.report.buckets) >= 4
    for epoch, seed, batch_size in ((0, 0, 1), (3, 7, 2), (1, 42, 3)):
        assert ds.epoch_order(epoch, seed, batch_size) == by_bucket_only(epoch, seed, batch_size)


# ---------------------------------------------------------------- edit pairs


def test_a_control_subfolder_pairs_sources_and_is_not_trained_on(lf, tmp_path):
    root = tmp_path / "d"
    save_image(root / "a.png", (64, 48), (10, 200, 10))
    save_image(root / "b.png", (64, 64))
    save_image(root / "c.png", (64, 64))
    for name in "abc":
        (root / f"{name}.txt").write_text(f"make it {name}", encoding="utf-8")
    source = np.zeros((40, 40, 3), np.uint8)
    source[:, :20] = (0, 0, 240)  # blue left, black right: a 1:1 source cut to the target's 80x48 bucket
    (root / "control").mkdir()
    Image.fromarray(source).save(root / "control" / "a.webp", lossless=True)
    save_image(root / "control" / "b.jpg", (64, 64), (250, 250, 250))
    save_image(tmp_path / "reg" / "r.png")
    ds = lf.dataset.load_dataset(root, reg_folder=tmp_path / "reg", **SMALL)
    assert [(i.path.name, i.control) for i in ds.items] == [
        ("a.png", root / "control" / "a.webp"), ("b.png", root / "control" / "b.jpg"), ("r.png", None)]
    assert ds.has_control
    assert reasons(ds) == {"c.png": "no control image: expected control/c.<png|jpg|webp>"}
    assert ds.report.captions_found == 2  # c.png was left out before its caption counted
    assert f"Control images ({root / 'control'}): 2 pairs" in ds.report.summary()
    a = ds.items[0]
    loaded = ds.load_control(a).numpy() * 255
    assert loaded.shape == (48, 80, 3) == tuple(ds.load_image(a).shape)
    assert np.allclose(loaded[:, :30], (0, 0, 240), atol=2) and np.allclose(loaded[:, -30:], 0, atol=2)
    mirrored = ds.load_control(a, flip=True).numpy() * 255
    assert np.allclose(mirrored[:, -30:], (0, 0, 240), atol=2) and np.allclose(mirrored[:, :30], 0, atol=2)
    with pytest.raises(lf.dataset.DatasetError, match="has no control image"):
        ds.load_control(ds.items[-1])


def test_an_explicit_control_folder_matches_relative_names(lf, tmp_path):
    root = tmp_path / "d"
    save_image(root / "5_sub" / "x.png")
    write_video(root / "5_sub" / "y.mp4", 9)
    sources = tmp_path / "sources"
    save_image(sources / "5_sub" / "x.PNG", (32, 32), (1, 2, 3))
    save_image(sources / "5_sub" / "y.png", (32, 32))
    save_image(root / "control" / "x.png")  # not the control folder when one is given: trained on
    ds = lf.dataset.load_dataset(root, control_folder=sources, frames=9, **SMALL)
    assert {(i.path.relative_to(root).as_posix(), i.control) for i in ds.items} == {
        ("5_sub/x.png", sources / "5_sub" / "x.PNG"), ("5_sub/y.mp4", sources / "5_sub" / "y.png")}
    assert reasons(ds)["x.png"] == f"no control image: expected {(sources / 'control' / 'x').as_posix()}.<png|jpg|webp>"
    plain = lf.dataset.load_dataset(root / "5_sub", frames=9, **SMALL)
    assert not plain.has_control and "Control images" not in plain.report.summary()


# ---------------------------------------------------------------- settings


def test_settings_reach_load_dataset_and_are_widgets_at_the_end(lf, pack, tmp_path):
    from lora_foundry.nodes.dataset import OPTIONAL_WIDGETS

    options = lf.options.DatasetOptions(folder="d", frames=33, frame_extraction="uniform", frame_rate=16.0,
                                        frame_multiple=8, control_folder="edits")
    args = options.load_arguments(lambda name, setting: tmp_path / f"{setting}:{name}")
    assert {k: args[k] for k in ("frames", "frame_extraction", "frame_rate", "frame_multiple", "control_folder")} == {
        "frames": 33, "frame_extraction": "uniform", "frame_rate": 16.0, "frame_multiple": 8,
        "control_folder": tmp_path / "control_folder:edits"}
    assert lf.options.DatasetOptions().load_arguments(lambda name, setting: Path(name))["control_folder"] is None
    # After every earlier widget (multi-resolution's `resolutions` came later).
    assert OPTIONAL_WIDGETS[-6:-1] == ["frames", "frame_extraction", "frame_rate", "frame_multiple", "control_folder"]
    with pytest.raises(ValueError, match="frame_extraction: 'all' is not one of head, uniform, chunk"):
        lf.options.DatasetOptions(frame_extraction="all")
