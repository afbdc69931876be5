"""Tests for the batched per-sample view policies in idaa.data.views."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kornia.color import hsv_to_rgb, rgb_to_hsv

from idaa.data import views as V
from idaa.data.views import POLICIES, ViewPolicy, build_view_policy, normalize
from idaa.imaging import to_unit_range

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
HALF = (0.5, 0.5, 0.5)  # with mean = std = 0.5, grey 0.5 maps to exactly 0 and equal channels stay equal


def _images(n: int, h: int, w: int | None = None, c: int = 3, seed: int = 0) -> torch.Tensor:
    """Random uint8 colour images."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w or h), dtype=torch.uint8, generator=g)


def _grey_ramp(n: int, size: int) -> torch.Tensor:
    """uint8 grey images whose value increases from left to right."""
    row = torch.linspace(0, 255, size).round().to(torch.uint8)
    return row.expand(n, 3, size, size).contiguous()


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("size", [32, 64])
def test_output_contract(policy: str, size: int) -> None:
    views = build_view_policy(policy, size, MEAN, STD)(_images(4, 40, 48))
    assert views.shape == (4, 3, size, size)
    assert views.dtype == torch.float32 and views.device.type == "cpu"
    assert views.is_contiguous() and not views.requires_grad
    assert torch.isfinite(views).all()
    x01 = views * torch.tensor(STD).view(1, -1, 1, 1) + torch.tensor(MEAN).view(1, -1, 1, 1)  # unclipped pixels
    assert x01.min() >= -1e-5 and x01.max() <= 1 + 1e-5


def test_empty_batch_and_device() -> None:
    out = ViewPolicy("simclr", 16, MEAN, STD)(torch.zeros(0, 3, 32, 32, dtype=torch.uint8))
    assert out.shape == (0, 3, 16, 16) and out.dtype == torch.float32
    if torch.cuda.is_available():
        for policy in POLICIES:
            views = ViewPolicy(policy, 32, MEAN, STD)(_images(4, 32).cuda())
            assert views.is_cuda and views.shape == (4, 3, 32, 32) and torch.isfinite(views).all()


@settings(max_examples=25, deadline=None)
@given(
    policy=st.sampled_from(POLICIES),
    n=st.integers(1, 8),
    h=st.integers(8, 72),
    w=st.integers(8, 72),
    size=st.integers(8, 64),
    c=st.sampled_from([1, 3]),
)
def test_any_batch_and_size(policy: str, n: int, h: int, w: int, size: int, c: int) -> None:
    views = ViewPolicy(policy, size, HALF[:c], HALF[:c])(_images(n, h, w, c=c))
    assert views.shape == (n, c, size, size) and views.dtype == torch.float32 and views.is_contiguous()
    assert torch.isfinite(views).all() and views.abs().max() <= 1 + 1e-5


def test_eval_is_plain_normalisation() -> None:
    x = _images(5, 32)
    assert torch.equal(ViewPolicy("eval", 32, MEAN, STD)(x), normalize(x.float() / 255, MEAN, STD))
    resized = F.interpolate(x.float() / 255, size=(16, 16), mode="bilinear", antialias=True)
    assert torch.allclose(ViewPolicy("eval", 16, MEAN, STD)(x), normalize(resized, MEAN, STD))
    x01 = torch.rand(3, 3, 8, 8)
    assert torch.allclose(to_unit_range(normalize(x01, MEAN, STD), MEAN, STD), x01, atol=1e-6)


@pytest.mark.parametrize("policy", POLICIES)
def test_seed_reproduces_batch(policy: str) -> None:
    aug, x = ViewPolicy(policy, 32, MEAN, STD), _images(6, 32)
    torch.manual_seed(123)
    a = aug(x)
    torch.manual_seed(123)
    assert torch.equal(a, aug(x))


@pytest.mark.parametrize("policy", ["simclr", "simsiam", "fixmatch-strong"])
def test_identical_images_get_different_views(policy: str) -> None:
    x = _images(1, 32).expand(2, 3, 32, 32).contiguous()
    views = ViewPolicy(policy, 32, MEAN, STD)(x)
    assert not torch.allclose(views[0], views[1])


def test_crop_boxes_respect_scale_and_ratio() -> None:
    torch.manual_seed(0)
    means = {}
    for policy, (lo, hi) in V._CROP_SCALE.items():
        x0, y0, cw, ch = V._crop_boxes(4000, 32, 32, (lo, hi), torch.device("cpu")).unbind(1)
        area = cw * ch / 32**2
        assert area.min() >= lo - 0.03 and area.max() <= hi
        assert (cw / ch).min() >= 0.7 and (cw / ch).max() <= 1.45  # 3/4..4/3 up to pixel rounding
        assert x0.min() >= 0 and y0.min() >= 0 and (x0 + cw).max() <= 32 and (y0 + ch).max() <= 32
        means[policy] = area.mean().item()
    assert 0.42 < means["simclr"] < 0.56 and 0.48 < means["simsiam"] < 0.62
    # a very wide image falls back (when the 10 tries fail) to a centred crop with the ratio clamped
    _, _, cw, ch = V._crop_boxes(2000, 10, 100, (0.9, 1.0), torch.device("cpu")).unbind(1)
    assert torch.all(cw == 13) and torch.all(ch == 10)


def test_crop_flip_samples_exactly_the_box() -> None:
    """On a linear ramp, bilinear sampling is exact, so the output must be the box's pixel-centre grid."""
    n, h, w, size = 64, 24, 40, 16
    cols = torch.arange(w, dtype=torch.float32).expand(h, w)
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    ramp = torch.stack([cols, rows, cols]).expand(n, 3, h, w)
    torch.manual_seed(7)
    x0, y0, cw, ch = V._crop_boxes(n, h, w, (0.08, 1.0), torch.device("cpu")).unbind(1)
    torch.manual_seed(7)
    out = V._crop_flip(ramp, size, (0.08, 1.0))
    j = torch.arange(size, dtype=torch.float32) + 0.5
    want_x = (x0[:, None] + j * cw[:, None] / size - 0.5).clamp(0, w - 1)
    want_y = (y0[:, None] + j * ch[:, None] / size - 0.5).clamp(0, h - 1)
    flipped = out[:, 0, 0, 0] > out[:, 0, 0, -1]
    want_x = torch.where(flipped[:, None], want_x.flip(1), want_x)
    assert torch.allclose(out[:, 0], want_x[:, None, :].expand(n, size, size), atol=1e-3)
    assert torch.allclose(out[:, 1], want_y[:, :, None].expand(n, size, size), atol=1e-3)
    assert 0.3 < flipped.float().mean() < 0.7


@pytest.mark.parametrize("policy", ["simclr", "fixmatch-weak"])
def test_flip_about_half(policy: str) -> None:
    torch.manual_seed(0)
    views = ViewPolicy(policy, 16, HALF, HALF)(_grey_ramp(800, 16))[:, 0]
    left, right = views[..., :8].mean((1, 2)), views[..., 8:].mean((1, 2))
    decided = (left - right).abs() > 1e-4  # a crop saturated by brightness jitter carries no direction
    assert decided.float().mean() > 0.8
    assert 0.43 < (left > right)[decided].float().mean() < 0.57


def test_grayscale_about_a_fifth() -> None:
    torch.manual_seed(0)
    views = ViewPolicy("simclr", 8, HALF, HALF)(_images(1500, 8))
    grey = (views - views[:, :1]).abs().amax((1, 2, 3)) < 1e-5
    assert 0.16 < grey.float().mean() < 0.24


def test_color_jitter_probability_and_identity() -> None:
    x = torch.rand(300, 3, 8, 8)
    torch.manual_seed(0)
    changed = (V._color_jitter(x) - x).abs().amax((1, 2, 3)) > 1e-6
    assert 0.74 < changed.float().mean() < 0.86
    assert torch.equal(V._color_jitter(x, p=0.0), x)


def test_hue_matches_hsv_round_trip() -> None:
    x = torch.rand(6, 3, 9, 9)
    x[0] = x[0, :1]  # grey image: hue is undefined and must be left alone
    shift = torch.tensor([0.1, -0.1, 0.5, 0.03, -0.45, 0.0])
    hsv = rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, :1] + 2 * math.pi * shift.view(-1, 1, 1, 1), 2 * math.pi)
    want = hsv_to_rgb(torch.cat([hue, hsv[:, 1:]], 1))
    assert torch.allclose(V._adjust_hue(x, shift), want, atol=1e-4)


def test_rand_augment_ops_range_and_neutral_magnitude() -> None:
    x = (torch.rand(5, 3, 16, 16) * 255).round() / 255
    neutral = {1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12}  # all but autocontrast and equalize are no-ops at v = 0
    for k, op in enumerate(V._RA_OPS):
        out = op(x, torch.empty(5).uniform_(-1, 1))
        assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1, k
        if k in neutral:
            assert torch.allclose(op(x, torch.zeros(5)), x, atol=1e-5), k
    assert torch.equal(V._ra_posterize(x, torch.ones(5)) * 255 % 16, torch.zeros_like(x))


def test_strong_view_has_grey_cutout() -> None:
    torch.manual_seed(0)
    views = ViewPolicy("fixmatch-strong", 32, HALF, HALF)(_images(64, 32))
    grey_pixels = (views == 0).all(1).sum((1, 2))
    assert grey_pixels.min() >= 8 * 8  # a 16 px square centred anywhere keeps at least a quarter inside


@pytest.mark.parametrize(
    "bad",
    [
        torch.rand(2, 3, 8, 8),
        torch.zeros(2, 3, 8, 8, dtype=torch.int64),
        torch.zeros(3, 8, 8, dtype=torch.uint8),
        torch.zeros(1, 2, 3, 8, 8, dtype=torch.uint8),
        torch.zeros(2, 3, 0, 8, dtype=torch.uint8),
        [[0]],
    ],
)
def test_bad_input_raises(bad: object) -> None:
    with pytest.raises(ValueError) as err:
        ViewPolicy("simclr", 8, MEAN, STD)(bad)
    assert "\n" not in str(err.value)


def test_bad_config_raises() -> None:
    with pytest.raises(ValueError, match="fixmatch-strong"):
        build_view_policy("autoaugment", 32, MEAN, STD)
    with pytest.raises(ValueError):
        ViewPolicy("simclr", 0, MEAN, STD)
    with pytest.raises(ValueError):
        ViewPolicy("simclr", 32, MEAN, (0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="channel"):
        ViewPolicy("eval", 8, MEAN, STD)(_images(2, 8, c=1))
