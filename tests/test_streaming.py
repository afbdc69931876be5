"""Streaming image source: decoding (modes, EXIF, draft), seeded crops, worker-independent batches, DDP shares."""

import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

from idaa.data import crops as crop_module
from idaa.data import decode as decode_module
from idaa.data import listing as listing_module
from idaa.data.crops import _resized, center_crop, crop_views
from idaa.data.decode import read_rgb
from idaa.data.feeds import StreamFeed, make_feed
from idaa.data.memory import ImageDataset
from idaa.data.options import StreamOptions
from idaa.data.sources import open_dataset
from idaa.data.streamed import StreamingDataset
from idaa.data.views import build_view_policy
from idaa.errors import DataError


def noise(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def smooth(w: int, h: int) -> Image.Image:
    """A gradient: crops of it decoded at different scales must agree closely (noise would not)."""
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


def mixed_folder(root: Path, per_class: int = 6, split: bool = True) -> Path:
    """train/ and test/ with two classes of JPEGs and PNGs of different sizes."""
    rng = np.random.default_rng(0)
    for part in ("train", "test") if split else ("",):
        for c in ("cat", "dog"):
            folder = root / part / c
            folder.mkdir(parents=True)
            for i in range(per_class):
                w, h = (int(v) for v in rng.integers(24, 80, 2))
                noise(w, h, seed=i).save(folder / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def test_any_mode_becomes_rgb_with_exif_orientation(tmp_path: Path) -> None:
    noise(20, 10).convert("L").save(tmp_path / "grey.png")
    noise(20, 10).convert("CMYK").save(tmp_path / "cmyk.jpg")
    noise(20, 10).convert("RGBA").save(tmp_path / "alpha.png")
    noise(20, 10).convert("P").save(tmp_path / "palette.png", transparency=0)
    Image.fromarray(np.full((10, 20), 40000, np.uint16)).save(tmp_path / "deep.png")  # 16-bit grey
    for name in ("grey.png", "cmyk.jpg", "alpha.png", "palette.png", "deep.png"):
        assert read_rgb(tmp_path / name).shape == (10, 20, 3), name
    assert abs(int(read_rgb(tmp_path / "deep.png")[0, 0, 0]) - 40000 // 256) <= 1  # scaled, not clipped
    # 40 x 20, left half red, right half blue, stored with "rotate 90 clockwise to display" (orientation 6)
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20, 0], pixels[:, 20:, 2] = 255, 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    shown = read_rgb(tmp_path / "rotated.jpg")
    assert shown.shape == (40, 20, 3)
    assert shown[2, 10, 0] > 200 and shown[-3, 10, 2] > 200  # left went to the top, right to the bottom
    crops = crop_views(tmp_path / "rotated.jpg", 0, 0, 0, 8, (0.9, 1.0), 1)
    assert crops[0, 0, 0].float().mean() > 150 and crops[0, 2, -1].float().mean() > 150  # crops see it upright
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(DataError, match="text.jpg"):
        read_rgb(tmp_path / "text.jpg")


def test_draft_decoding_and_seeded_crops(tmp_path: Path) -> None:
    smooth(1600, 1200).save(tmp_path / "big.jpg", quality=95)
    reduced = read_rgb(tmp_path / "big.jpg", min_side=100)
    assert 100 <= min(reduced.shape[:2]) < 1200 // 4  # decoded at 1/8, not at full size
    full = Image.fromarray(read_rgb(tmp_path / "big.jpg"))
    a = crop_views(tmp_path / "big.jpg", index=3, epoch=1, seed=7, size=32, scale=(0.08, 1.0), views=2)
    b = crop_views(full, index=3, epoch=1, seed=7, size=32, scale=(0.08, 1.0), views=2)
    assert a.shape == (2, 3, 32, 32) and a.dtype == torch.uint8
    assert (a.float() - b.float()).abs().mean() < 3  # the same boxes, whatever the decode scale
    assert torch.equal(a, crop_views(tmp_path / "big.jpg", 3, 1, 7, 32, (0.08, 1.0), 2))
    assert not torch.equal(a, crop_views(tmp_path / "big.jpg", 3, 2, 7, 32, (0.08, 1.0), 2))  # next epoch
    assert not torch.equal(a[0], a[1])  # two independent views
    with open(tmp_path / "big.jpg", "rb") as handle:  # file objects too (shards)
        assert torch.equal(center_crop(handle, 16), center_crop(tmp_path / "big.jpg", 16))


def _pillow_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode_module, "simplejpeg", None)


@pytest.mark.skipif(decode_module.simplejpeg is None, reason="simplejpeg not installed")
def test_libjpeg_turbo_path_gives_pillows_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RGB and grey JPEGs skip Pillow's decoder: the same pixels and crops at every scale and EXIF orientation."""
    files = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        noise(61, 40, seed=orientation).filter(ImageFilter.GaussianBlur(1)).save(
            tmp_path / f"o{orientation}.jpg", exif=exif, quality=90)
        files.append(tmp_path / f"o{orientation}.jpg")
    smooth(900, 700).save(tmp_path / "big.jpg", quality=90, progressive=True)
    noise(50, 30).convert("L").save(tmp_path / "grey.jpg")
    files += [tmp_path / "big.jpg", tmp_path / "grey.jpg"]
    calls = []
    decode = decode_module.simplejpeg.decode_jpeg
    monkeypatch.setattr(decode_module.simplejpeg, "decode_jpeg", lambda *a, **k: calls.append(1) or decode(*a, **k))
    turbo = [(read_rgb(f), read_rgb(f, min_side=20), crop_views(f, 3, 1, 7, 16, (0.08, 1.0), 2, fast_decode=False),
              center_crop(f, 24)) for f in files]
    assert len(calls) == 4 * len(files)  # every one of them decoded by libjpeg-turbo
    _pillow_only(monkeypatch)
    for f, (full, reduced, crops, centre) in zip(files, turbo, strict=True):
        upright = np.asarray(ImageOps.exif_transpose(Image.open(f)).convert("RGB"))
        assert np.array_equal(full, upright), f.name
        assert np.array_equal(reduced, read_rgb(f, min_side=20)), f.name
        assert torch.equal(crops, crop_views(f, 3, 1, 7, 16, (0.08, 1.0), 2, fast_decode=False)), f.name
        assert torch.equal(centre, center_crop(f, 24)), f.name
    assert read_rgb(tmp_path / "big.jpg", min_side=80).shape == (88, 113, 3)  # 700 x 900 decoded at 1/8


@pytest.mark.skipif(decode_module.simplejpeg is None, reason="simplejpeg not installed")
def test_plain_jpegs_skip_pillows_header_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """RGB/grey JPEGs, with or without EXIF, are sized by libjpeg-turbo; CMYK, PNG and broken files open in Pillow."""
    noise(61, 40).save(tmp_path / "plain.jpg")
    noise(30, 50).convert("L").save(tmp_path / "grey.jpg")
    exif = Image.Exif()
    exif[0x0112] = 1  # present, even if it changes nothing: Pillow reads it
    noise(61, 40).save(tmp_path / "exif.jpg", exif=exif)
    noise(20, 10).convert("CMYK").save(tmp_path / "cmyk.jpg")
    noise(20, 10).save(tmp_path / "image.png")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "plain.jpg").read_bytes()[:30])  # header cut short
    opened, lazy = [], decode_module._lazy
    monkeypatch.setattr(decode_module, "_lazy", lambda file, name: opened.append(Path(name).name) or lazy(file, name))
    files = ("plain.jpg", "grey.jpg", "exif.jpg", "cmyk.jpg", "image.png")
    sizes = {f: decode_module.EncodedImage(tmp_path / f).size for f in files}
    assert opened == ["cmyk.jpg", "image.png"]
    assert sizes == {f: Image.open(tmp_path / f).size for f in sizes}
    with pytest.raises(DataError, match="cut.jpg"):
        crop_views(tmp_path / "cut.jpg", 0, 0, 0, 8, (0.5, 1.0), 1)
    crops = crop_views(tmp_path / "plain.jpg", 0, 0, 0, 8, (0.5, 1.0), 2, fast_decode=False)
    _pillow_only(monkeypatch)  # the same crops when Pillow reads the header
    assert torch.equal(crops, crop_views(tmp_path / "plain.jpg", 0, 0, 0, 8, (0.5, 1.0), 2, fast_decode=False))


def _with_app1(jpeg: bytes, *payloads: bytes) -> bytes:
    """`jpeg` with APP1 segments holding `payloads` right after its start marker."""
    segments = b"".join(b"\xff\xe1" + (len(p) + 2).to_bytes(2, "big") + p for p in payloads)
    return jpeg[:2] + segments + jpeg[2:]


def _tiff(order: str, entries: list[tuple[int, int, int, bytes]], first: int = 8) -> bytes:
    """An EXIF block: TIFF header in byte `order` ("little"/"big") and one directory of (tag, type, count, value)."""
    head = (b"II" if order == "little" else b"MM") + (42).to_bytes(2, order) + first.to_bytes(4, order)
    ifd = len(entries).to_bytes(2, order) + b"".join(
        t.to_bytes(2, order) + k.to_bytes(2, order) + n.to_bytes(4, order) + v.ljust(4, b"\x00")
        for t, k, n, v in entries)
    return b"Exif\x00\x00" + head + ifd + (0).to_bytes(4, order)


@pytest.mark.skipif(decode_module.simplejpeg is None, reason="simplejpeg not installed")
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow, of the bad offset
def test_exif_orientation_is_read_from_the_header_as_pillow_reads_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both byte orders, other tags around it, no tag at all: Pillow's orientation without Pillow; blocks Pillow
    would read differently (a LONG tag, two EXIF blocks it joins, XMP it may take it from, a bad offset) go to it."""
    buffer = io.BytesIO()
    noise(61, 40).save(buffer, "JPEG", quality=90)
    jpeg = buffer.getvalue()
    short = {order: lambda v, order=order: (0x0112, 3, 1, v.to_bytes(2, order)) for order in ("little", "big")}
    make = (0x010F, 2, 4, b"Cam\x00")
    pillow_exif = Image.Exif()
    pillow_exif[0x0112] = 6
    ours = {"pillow-written.jpg": _with_app1(jpeg, pillow_exif.tobytes()),
            "big-endian.jpg": _with_app1(jpeg, _tiff("big", [make, short["big"](8)])),
            "little-endian.jpg": _with_app1(jpeg, _tiff("little", [make, short["little"](3), (0x131, 2, 2, b"x")])),
            "no-tag.jpg": _with_app1(jpeg, _tiff("big", [make])),
            "zero.jpg": _with_app1(jpeg, _tiff("little", [short["little"](0)]))}
    pillows = {"long.jpg": _with_app1(jpeg, _tiff("big", [(0x0112, 4, 1, (6).to_bytes(4, "big"))])),
               "two-blocks.jpg": _with_app1(jpeg, _tiff("big", [make]), _tiff("big", [short["big"](6)])),
               "xmp.jpg": _with_app1(jpeg, b"http://ns.adobe.com/xap/1.0/\x00<x tiff:Orientation=\"6\"/>"),
               "bad-offset.jpg": _with_app1(jpeg, _tiff("little", [short["little"](6)], first=4000))}
    for name, data in {**ours, **pillows}.items():
        (tmp_path / name).write_bytes(data)
    opened, lazy = [], decode_module._lazy
    monkeypatch.setattr(decode_module, "_lazy", lambda file, name: opened.append(Path(name).name) or lazy(file, name))
    seen = {name: decode_module.EncodedImage(tmp_path / name) for name in {**ours, **pillows}}
    assert opened == list(pillows)
    expected = {name: decode_module._orientation(Image.open(tmp_path / name)) for name in seen}
    assert {name: e.orientation for name, e in seen.items()} == expected
    assert [expected[n] for n in ours] == [6, 8, 3, 1, 1] and expected["xmp.jpg"] == 6  # Pillow reads XMP too
    for name, e in seen.items():
        assert e.size == decode_module.oriented_size(Image.open(tmp_path / name)), name
        assert np.array_equal(read_rgb(tmp_path / name), np.asarray(ImageOps.exif_transpose(Image.open(
            tmp_path / name)).convert("RGB"))), name


@pytest.mark.skipif(decode_module.simplejpeg is None, reason="simplejpeg not installed")
def test_training_crops_decode_fast_within_a_grey_level(tmp_path: Path) -> None:
    """Training crops take libjpeg-turbo's fast IDCT and chroma upsampling: other pixels, about one level off."""
    photo = Image.blend(smooth(420, 360), noise(420, 360).filter(ImageFilter.GaussianBlur(1.5)), 0.4)  # texture
    photo.save(tmp_path / "photo.jpg", quality=90)
    fast = crop_views(tmp_path / "photo.jpg", 3, 1, 7, 224, (0.9, 1.0), 2)
    exact = crop_views(tmp_path / "photo.jpg", 3, 1, 7, 224, (0.9, 1.0), 2, fast_decode=False)
    assert not torch.equal(fast, exact)  # the fast decoder really ran
    assert (fast.float() - exact.float()).abs().mean() < 1.5
    assert torch.equal(fast, crop_views(tmp_path / "photo.jpg", 3, 1, 7, 224, (0.9, 1.0), 2))  # still deterministic


@pytest.mark.skipif(decode_module.simplejpeg is None, reason="simplejpeg not installed")
def test_what_libjpeg_only_warns_about_is_decided_by_pillow(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Extraneous bytes before a marker decode as Pillow decodes them; a truncated JPEG names its file either way."""
    buffer = io.BytesIO()
    noise(64, 48).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    sos = data.index(b"\xff\xda")
    (tmp_path / "junk.jpg").write_bytes(data[:sos] + b"\x00\x00" + data[sos:])  # libjpeg: "extraneous bytes"
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError):
        decode_module.simplejpeg.decode_jpeg((tmp_path / "junk.jpg").read_bytes(), colorspace="RGB")
    junk = read_rgb(tmp_path / "junk.jpg")
    for decoder in ("simplejpeg", "pillow"):
        if decoder == "pillow":
            _pillow_only(monkeypatch)
        assert np.array_equal(read_rgb(tmp_path / "junk.jpg"), junk)
        with pytest.raises(DataError, match="cut.jpg"):
            crop_views(tmp_path / "cut.jpg", 0, 0, 0, 16, (0.08, 1.0), 1)


def _photo(w: int, h: int) -> Image.Image:
    return Image.blend(smooth(w, h), noise(w, h).filter(ImageFilter.GaussianBlur(1.5)), 0.4)


def _cropped(path: Path) -> list[torch.Tensor]:
    """Training crops (fast and exact decoding, 2 views, at a scale that draft reduces and one it does not) and
    evaluation crops of one file."""
    crops = [crop_views(path, i, 1, 5, size, (0.08, 1.0), 2, fast_decode=fast)
             for i in range(10) for size in (224, 40) for fast in (True, False)]
    return crops + [center_crop(path, size) for size in (224, 40)]


@pytest.mark.skipif(decode_module.simplejpeg is None, reason="simplejpeg not installed")
@pytest.mark.parametrize("kind", ["4:2:0", "4:2:2", "4:4:4", "restarts", "grey", "exif", "exif-rotated"])
def test_decoding_stops_below_the_crops_without_changing_a_pixel(
        kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A baseline JPEG is decoded only down to its lowest crop: every crop is the whole decode's, to the pixel."""
    options: dict = {"4:2:0": {"subsampling": 2}, "4:2:2": {"subsampling": 1}, "4:4:4": {"subsampling": 0},
                     "restarts": {"restart_marker_rows": 1}}.get(kind, {})
    if kind.startswith("exif"):
        exif = Image.Exif()
        exif[0x0112] = 6 if kind == "exif-rotated" else 1
        options["exif"] = exif
    stopped: list[tuple[int, int]] = []
    scales: set[int] = set()
    top_rows = decode_module.EncodedImage._top_rows

    def spy(self, k, fast, rows):
        out = top_rows(self, k, fast, rows)
        if out is not None:
            stopped.append((out.shape[0], math.ceil(self.stored[1] / k)))
            scales.add(k)
        return out

    monkeypatch.setattr(decode_module.EncodedImage, "_top_rows", spy)
    photo = _photo(613, 517)
    files = []
    for name, img in (("photo.jpg", photo), ("large.jpg", photo.resize((1900, 1500)))):
        (img.convert("L") if kind == "grey" else img).save(tmp_path / name, quality=90, **options)
        files.append(tmp_path / name)
    early = [crop for f in files for crop in _cropped(f)]
    if kind == "exif-rotated":
        assert not stopped  # rows of the stored image are not the displayed image's: decoded whole
    else:
        assert stopped and all(rows < whole for rows, whole in stopped)  # it did stop early...
        assert scales >= {1, 2}  # ...at full and at reduced (draft) scales...
        assert sum(rows for rows, _ in stopped) < 0.95 * sum(whole for _, whole in stopped)
    monkeypatch.setattr(decode_module.EncodedImage, "_top_rows", lambda self, k, fast, rows: None)
    whole = [crop for f in files for crop in _cropped(f)]
    assert all(torch.equal(a, b) for a, b in zip(early, whole, strict=True))  # ...and changed nothing


@pytest.mark.skipif(decode_module.simplejpeg is None, reason="simplejpeg not installed")
def test_decoding_early_leaves_progressive_and_damaged_files_to_the_whole_decode(tmp_path: Path) -> None:
    """Only a one-scan baseline JPEG stops early; a cut file or one libjpeg warns about goes to the whole decode."""
    buffer = io.BytesIO()
    _photo(300, 260).save(buffer, "JPEG", quality=90)
    data = buffer.getvalue()
    _photo(300, 260).save(tmp_path / "progressive.jpg", quality=90, progressive=True)
    assert decode_module.EncodedImage(tmp_path / "progressive.jpg")._frame is None
    assert decode_module.EncodedImage(io.BytesIO(data))._top_rows(1, False, 20).shape == (48, 300, 3)  # 2 MCU rows
    sos = data.index(b"\xff\xda")
    damaged = {"cut.jpg": data[: len(data) * 3 // 4], "junk.jpg": data[:sos] + b"\x00\x00" + data[sos:]}
    for name, content in damaged.items():
        (tmp_path / name).write_bytes(content)
        assert decode_module.EncodedImage(tmp_path / name)._top_rows(1, False, 20) is None
    with pytest.raises(DataError, match="cut.jpg"):  # its top rows are intact, yet it names the file
        center_crop(tmp_path / "cut.jpg", 32)


@pytest.mark.parametrize("size", [224, 64])
def test_crops_resample_as_pillow_does(size: int) -> None:
    """torch's uint8 antialiased bilinear stands in for Pillow's resize: the same filter, up to rounding."""
    img = noise(400, 350, seed=3).filter(ImageFilter.GaussianBlur(2))
    rng = np.random.default_rng(0)
    for _ in range(8):
        cw, ch = (int(v) for v in rng.integers(100, 340, 2))
        x0, y0 = int(rng.integers(0, 400 - cw)), int(rng.integers(0, 350 - ch))
        ours = _resized(np.asarray(img), (x0, y0, cw, ch), img.size, size)
        pillow = np.array(img.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch)))
        assert ours.shape == (3, size, size) and ours.dtype == torch.uint8
        difference = (ours.permute(1, 2, 0).int() - torch.from_numpy(pillow).int()).abs()
        assert difference.float().mean() < 0.1 and difference.max() <= 4  # a box one pixel off: mean 2-3, max 12-15


def test_enlarged_crops_take_the_plain_kernel_without_changing_a_pixel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A crop enlarged on both axes skips the antialiasing pass; its pixels stay those of the antialiased filter,
    written channels-last, the same pixels F.interpolate gives."""
    pixels = np.asarray(noise(300, 260, seed=5))
    flags = []
    kernels = dict(crop_module._RESIZE)
    monkeypatch.setattr(crop_module, "_RESIZE", {k: lambda *a, k=k, **kw: flags.append(k) or kernels[k](*a, **kw)
                                               for k in kernels})
    rng = np.random.default_rng(1)
    cases = [(40, 40), (223, 224), (224, 224), (100, 201), (7, 150), (150, 250), (260, 100)]
    for cw, ch in cases:
        x0, y0 = int(rng.integers(0, 300 - cw)), int(rng.integers(0, 260 - ch))
        region = torch.from_numpy(pixels[y0:y0 + ch, x0:x0 + cw].copy()).permute(2, 0, 1)[None]
        reference = F.interpolate(region, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)[0]
        ours = _resized(pixels, (x0, y0, cw, ch), (300, 260), 224)
        assert torch.equal(ours, reference) and ours.permute(1, 2, 0).is_contiguous()
    assert flags == [False] * 5 + [True] * 2  # shrunk on either axis: the antialiased filter


def test_crops_stack_channels_last_and_train_channels_first(tmp_path: Path) -> None:
    """Crops and their batches stay channels-last in memory until the device; the values are those of stacking."""
    smooth(120, 90).save(tmp_path / "a.jpg")
    noise(70, 100).save(tmp_path / "b.png")
    crops = [crop_views(tmp_path / f, i, 0, 0, 32, (0.3, 1.0), 2) for i, f in enumerate(("a.jpg", "b.png"))]
    crops.append(torch.zeros((2, 3, 32, 32), dtype=torch.uint8))  # an unreadable file's placeholder
    batch = crop_module.stack_crops(crops)
    assert torch.equal(batch, torch.stack(crops)) and batch.movedim(-3, -1).is_contiguous()
    first = crop_module.channels_first(batch, torch.device("cpu"))
    assert torch.equal(first, batch) and first.is_contiguous()
    centre = crop_module.stack_crops([center_crop(tmp_path / "a.jpg", 24), center_crop(tmp_path / "b.png", 24)])
    assert centre.shape == (2, 3, 24, 24) and centre.movedim(1, -1).is_contiguous()


def test_center_crop_keeps_the_middle_of_the_shorter_side(tmp_path: Path) -> None:
    pixels = np.zeros((30, 90, 3), np.uint8)
    pixels[:, 30:60] = 255  # only the middle third is white
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    crop = center_crop(tmp_path / "wide.png", 12)
    assert crop.shape == (3, 12, 12) and crop[:, :, 1:-1].min() == 255


def test_source_choice_listing_cache_and_stats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    uniform = tmp_path / "uniform"
    for i in range(4):
        (uniform / "a").mkdir(parents=True, exist_ok=True)
        noise(16, 16, seed=i).save(uniform / "a" / f"{i}.png")
    assert isinstance(open_dataset("folder", uniform), ImageDataset)  # small uniform data stays in memory
    streamed = open_dataset("folder", uniform, options=StreamOptions(stream=True))
    assert isinstance(streamed, StreamingDataset) and streamed.image_size == 16
    assert isinstance(open_dataset("folder", uniform, options=StreamOptions(image_size=32)), StreamingDataset)
    with pytest.raises(DataError, match="--stream needs image files"):
        open_dataset("digits", options=StreamOptions(stream=True))
    root = mixed_folder(tmp_path / "mixed")
    train = open_dataset("folder", root, options=StreamOptions(image_size=24, workers=0))
    test = open_dataset("folder", root, "test", options=StreamOptions(workers=0), like=train)
    assert isinstance(train, StreamingDataset) and (train.image_size, test.image_size) == (24, 24)
    assert test.mean == train.mean and 0.3 < train.mean[0] < 0.7 and train.classes == ["cat", "dog"]
    assert (root / ".idaa-listing-train.json").is_file() and (root / ".idaa-stats-train.json").is_file()
    monkeypatch.setattr(Image, "open", lambda *a, **k: (_ for _ in ()).throw(AssertionError("header re-read")))
    read_json, parsed = listing_module._read_json, []
    monkeypatch.setattr(listing_module, "_read_json", lambda path: parsed.append(path.name) or read_json(path))
    again = open_dataset("folder", root, options=StreamOptions(image_size=24, workers=0))  # headers + stats cached
    assert again.mean == train.mean and again.files == train.files
    assert parsed.count(".idaa-listing-train.json") == 1  # a big listing is parsed once, not again for the stats
    monkeypatch.undo()
    images = train.images
    assert images.shape == (12, 3, 24, 24) and len(images[[0, 5]]) == 2
    crops = torch.cat(list(images.split(5)))
    assert torch.equal(crops[7], center_crop(train.files[7], 24))
    assert torch.equal(images[np.array([7])].to("cpu")[0], crops[7])
    sub = train.take(4, seed=0)
    assert len(sub) == 4 and sorted(sub.labels.tolist()) == [0, 0, 1, 1]


def epoch_batches(feed: StreamFeed, epoch: int, order: torch.Tensor, first: int = 0) -> list[torch.Tensor]:
    return [torch.stack([b.first, b.second, b.source], 1) for b in feed.batches(epoch, order, first)]


def test_same_crops_with_0_and_2_workers(tmp_path: Path) -> None:
    root = mixed_folder(tmp_path)
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    feeds = [make_feed(open_dataset("folder", root, options=StreamOptions(image_size=16, workers=w)),
                       torch.device("cpu"), 4, views=3) for w in (0, 2)]
    assert all(isinstance(f, StreamFeed) and f.crops for f in feeds)
    zero, two = epoch_batches(feeds[0], 1, order), epoch_batches(feeds[1], 1, order)
    assert len(zero) == 3 and all(torch.equal(a, b) for a, b in zip(zero, two, strict=True))
    assert not torch.equal(zero[0][:, 0], zero[0][:, 1])  # views differ
    assert all(torch.equal(a, b) for a, b in zip(zero[1:], epoch_batches(feeds[1], 1, order, first=1), strict=True))
    assert not torch.equal(zero[0], epoch_batches(feeds[0], 2, order)[0])  # a new epoch, new crops
    colour = build_view_policy("simclr", 16, (0.5,) * 3, (0.25,) * 3, crop=False)
    assert colour(zero[0][:, 0]).shape == (4, 3, 16, 16)


DDP_CASE = '''
import sys

import torch
import torch.distributed as td

from idaa import distributed as dist
from idaa.data.feeds import make_feed
from idaa.data.options import StreamOptions
from idaa.data.sources import open_dataset

torch.set_num_threads(1)
root, out = sys.argv[1:3]
dist.setup("cpu")
rank, world = dist.rank(), dist.world_size()
data = open_dataset("folder", root, options=StreamOptions(image_size=8, workers=1))
feed = make_feed(data, torch.device("cpu"), batch_size=4, local_batch=4 // world, rank=rank)
seen = {}
for epoch in (1, 2):
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(epoch))  # as pretrain broadcasts it
    seen[epoch] = [i for batch in feed.batches(epoch, order) for i in batch.index.tolist()]
gathered = dist.gather_objects(seen)
if rank == 0:
    torch.save({"world": world, "seen": gathered}, out)
td.barrier()
dist.teardown()
'''


def test_two_ranks_read_disjoint_shares_covering_the_epoch(tmp_path: Path) -> None:
    root = mixed_folder(tmp_path / "data", per_class=5, split=False)  # 10 images: 2 batches of 4, 2 left over
    script, out = tmp_path / "case.py", tmp_path / "seen.pt"
    script.write_text(DDP_CASE)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               str(root), str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(out, weights_only=False)
    assert result["world"] == 2
    for epoch in (1, 2):
        ranks = [set(seen[epoch]) for seen in result["seen"]]
        order = torch.randperm(10, generator=torch.Generator().manual_seed(epoch))
        assert not ranks[0] & ranks[1] and all(len(r) == 4 for r in ranks)
        assert ranks[0] | ranks[1] == set(order[:8].tolist())  # the epoch's full batches, nothing else
