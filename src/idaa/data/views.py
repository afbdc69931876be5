"""Batched, per-sample random view augmentation on the training device (uint8 batches -> normalised views).

Every sample of a batch draws its own parameters. The geometric and colour steps are written as a few
vectorised tensor ops over the whole batch (one ``grid_sample`` for crop+flip, broadcast blends for the
colour jitter) because the generic per-module ``kornia.augmentation`` path costs several times more on CPU;
kornia is kept for histogram equalisation, which it does batched and well, and serves as the test oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from kornia.enhance import equalize
from torch import Tensor

POLICIES = ("simclr", "simsiam", "clae", "fixmatch-weak", "fixmatch-strong", "eval")

_CROP_SCALE = {"simclr": (0.08, 1.0), "simsiam": (0.2, 1.0), "clae": (0.2, 1.0)}
_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
_JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue (torchvision ColorJitter semantics)
_JITTER_P, _GREY_P, _FLIP_P = 0.8, 0.2, 0.5
_LUMA = (0.299, 0.587, 0.114)
_FILL = 0.5  # grey used by FixMatch for Cutout and for pixels uncovered by RandAugment's geometric ops


def _as_stats(values: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    """Turn per-channel mean/std into a C x 1 x 1 tensor on ``like``'s device, for broadcasting."""
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(-1, 1, 1)


def normalize(x01: Tensor, mean: Sequence[float] | Tensor, std: Sequence[float] | Tensor) -> Tensor:
    """Map a [0, 1] float image batch to the network's normalised input space, channel-wise."""
    return (x01 - _as_stats(mean, x01)) / _as_stats(std, x01)


def _check_images(images: object) -> Tensor:
    """Reject anything but a uint8 N x C x H x W tensor with a one-line ValueError."""
    if not isinstance(images, Tensor):
        raise ValueError(f"views expect a uint8 N x C x H x W tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"views expect uint8 images (0..255), got dtype {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"views expect a 4-d N x C x H x W batch, got shape {tuple(images.shape)}")
    if min(images.shape[1:]) < 1:
        raise ValueError(f"views expect non-empty images, got shape {tuple(images.shape)}")
    return images


def _grey(x: Tensor) -> Tensor:
    """Luma (ITU-R 601, as torchvision) of an RGB batch as N x 1 x H x W; channel mean otherwise."""
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(x: Tensor, base: Tensor, factor: Tensor) -> Tensor:
    """PIL/torchvision enhance: base + factor * (x - base), clamped to [0, 1]; factor is per sample."""
    return (base + factor.view(-1, 1, 1, 1) * (x - base)).clamp_(0.0, 1.0)


def _resize(x: Tensor, size: int) -> Tensor:
    """Antialiased bilinear resize to size x size, skipped when the batch already has that size."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


# ---------------------------------------------------------------- geometry


def _crop_boxes(n: int, h: int, w: int, scale: tuple[float, float], device: torch.device) -> Tensor:
    """Sample torchvision RandomResizedCrop boxes (x0, y0, cw, ch) in pixels, 10 tries vectorised."""
    tries = 10
    area = torch.empty(n, tries, device=device).uniform_(*scale) * (h * w)
    log_r = torch.empty(n, tries, device=device).uniform_(math.log(_CROP_RATIO[0]), math.log(_CROP_RATIO[1]))
    aspect = torch.exp(log_r)
    cw = torch.sqrt(area * aspect).round()
    ch = torch.sqrt(area / aspect).round()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.to(torch.uint8).argmax(1, keepdim=True)  # first successful try (index 0 when none)
    cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)
    # Fallback of torchvision: centre crop of the whole image with the aspect ratio clamped into range.
    fw, fh = w, h
    if w / h < _CROP_RATIO[0]:
        fh = round(w / _CROP_RATIO[0])
    elif w / h > _CROP_RATIO[1]:
        fw = round(h * _CROP_RATIO[1])
    found = ok.any(1)
    cw = torch.where(found, cw, torch.full_like(cw, fw))
    ch = torch.where(found, ch, torch.full_like(ch, fh))
    x0 = torch.where(found, (torch.rand(n, device=device) * (w - cw + 1)).floor(), (w - cw).div(2).floor())
    y0 = torch.where(found, (torch.rand(n, device=device) * (h - ch + 1)).floor(), (h - ch).div(2).floor())
    return torch.stack([x0, y0, cw, ch], 1)


def _crop_flip(x: Tensor, size: int, scale: tuple[float, float], flip_p: float = _FLIP_P) -> Tensor:
    """Random resized crop + horizontal flip of a float batch as a single affine ``grid_sample``."""
    # One batched grid_sample replaces kornia's crop_by_indices/warp path (~5x faster on CPU), flip folded in.
    n, c, h, w = x.shape
    x0, y0, cw, ch = _crop_boxes(n, h, w, scale, x.device).unbind(1)
    sign = torch.where(torch.rand(n, device=x.device) < flip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0] = sign * cw / w
    theta[:, 0, 2] = (2 * x0 + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * y0 + ch) / h - 1
    grid = F.affine_grid(theta.to(x.dtype), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _flip(x: Tensor, flip_p: float = _FLIP_P) -> Tensor:
    """Horizontal flip of each sample with probability flip_p (the crop is already done)."""
    on = (torch.rand(x.shape[0], device=x.device) < flip_p).view(-1, 1, 1, 1)
    return torch.where(on, x.flip(3), x)


def _pad_crop_flip(x: Tensor, flip_p: float = _FLIP_P, frac: float = 0.125) -> Tensor:
    """FixMatch weak view: flip + integer shift of up to ``frac`` of the size by reflect pad-and-crop."""
    # Two integer gathers on the padded batch: exact (no interpolation) and per-sample, unlike a fixed crop.
    n, c, h, w = x.shape
    pad = max(1, round(frac * min(h, w)))
    pad = min(pad, h - 1, w - 1)
    if pad < 1:
        return x
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
    rows = dy + torch.arange(h, device=x.device)
    cols = dx + torch.arange(w, device=x.device)
    cols = torch.where(torch.rand(n, 1, device=x.device) < flip_p, cols.flip(1), cols)
    xp = xp.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, w + 2 * pad))
    return xp.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


# ---------------------------------------------------------------- colour


def _adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """torchvision adjust_hue: rotate the HSV hue of an RGB batch by ``shift`` (a fraction of a turn)."""
    # Direct hue-sextant formula (value and chroma are invariant): 2x faster than kornia's rgb<->hsv trip.
    r, g, b = x.unbind(1)
    v = x.amax(1)
    c = v - x.amin(1)
    cs = torch.where(c > 0, c, 1.0)
    h6 = torch.where(v == r, (g - b) / cs, torch.where(v == g, (b - r) / cs + 2, (r - g) / cs + 4))
    h6 = h6 + 6 * shift.view(-1, 1, 1)
    out = []
    for n in (5.0, 3.0, 1.0):  # R, G, B from (hue, value, chroma)
        k = torch.remainder(h6 + n, 6.0)
        out.append(v - c * torch.minimum(k, 4 - k).clamp_(0.0, 1.0))
    return torch.stack(out, 1).clamp_(0.0, 1.0)


def _color_jitter(x: Tensor, p: float = _JITTER_P, strength: tuple[float, ...] = _JITTER) -> Tensor:
    """torchvision ColorJitter with probability p per sample (others untouched), op order per batch."""
    # Hand-written broadcast blends: kornia's ColorJitter module is ~4x slower and runs on the whole batch.
    n, dev = x.shape[0], x.device
    idx = (torch.rand(n, device=dev) < p).nonzero().squeeze(1)
    b, c, s = (torch.empty(n, device=dev).uniform_(1 - v, 1 + v)[idx] for v in strength[:3])
    hue = torch.empty(n, device=dev).uniform_(-strength[3], strength[3])[idx]
    y = x.index_select(0, idx)
    for op in torch.randperm(4).tolist():
        if op == 0:
            y = (y * b.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)
        elif op == 1:
            y = _blend(y, _grey(y).mean((1, 2, 3), keepdim=True), c)
        elif op == 2:
            y = _blend(y, _grey(y), s)
        elif y.shape[1] == 3:
            y = _adjust_hue(y, hue)
    return x.index_copy(0, idx, y)


def _random_grayscale(x: Tensor, p: float = _GREY_P) -> Tensor:
    """Replace each sample by its luma replicated on all channels with probability p."""
    on = (torch.rand(x.shape[0], device=x.device) < p).view(-1, 1, 1, 1)
    return torch.where(on, _grey(x).expand_as(x), x)


# ---------------------------------------------------------------- RandAugment (FixMatch strong view)


def _affine(x: Tensor, a: Tensor) -> Tensor:
    """Warp a square batch by per-sample 2 x 3 maps (output -> input, normalised coords), grey fill."""
    grid = F.affine_grid(a.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x - _FILL, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (out + _FILL).clamp_(0.0, 1.0)


def _eye(v: Tensor) -> Tensor:
    """Per-sample identity 2 x 3 affine maps, to be edited by the geometric ops."""
    return torch.eye(2, 3, device=v.device).repeat(v.shape[0], 1, 1)


def _ra_rotate(x: Tensor, v: Tensor) -> Tensor:
    """Rotate by up to +-30 degrees."""
    t = torch.deg2rad(30.0 * v)
    a = _eye(v)
    a[:, 0, 0], a[:, 0, 1], a[:, 1, 0], a[:, 1, 1] = t.cos(), -t.sin(), t.sin(), t.cos()
    return _affine(x, a)


def _ra_shear(axis: int) -> Callable[[Tensor, Tensor], Tensor]:
    """Shear along x (axis 0) or y (axis 1) by up to +-0.3."""

    def op(x: Tensor, v: Tensor) -> Tensor:
        a = _eye(v)
        a[:, axis, 1 - axis] = 0.3 * v
        return _affine(x, a)

    return op


def _ra_translate(axis: int) -> Callable[[Tensor, Tensor], Tensor]:
    """Translate along x (axis 0) or y (axis 1) by up to +-30% of the size, as FixMatch."""

    def op(x: Tensor, v: Tensor) -> Tensor:
        a = _eye(v)
        a[:, axis, 2] = 2 * 0.3 * v
        return _affine(x, a)

    return op


def _ra_autocontrast(x: Tensor, v: Tensor) -> Tensor:
    """Stretch every channel of every image to the full [0, 1] range (no-op on flat channels)."""
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    flat = hi <= lo
    return torch.where(flat, x, (x - lo) / torch.where(flat, 1.0, hi - lo)).clamp_(0.0, 1.0)


def _ra_posterize(x: Tensor, v: Tensor) -> Tensor:
    """Keep 8 down to 4 most significant bits per pixel."""
    bits = 8 - (4 * v.abs()).round().to(torch.int32)
    mask = ((255 << (8 - bits)) & 255).to(torch.uint8).view(-1, 1, 1, 1)
    return ((x * 255).round_().to(torch.uint8) & mask).float() / 255


def _ra_solarize(x: Tensor, v: Tensor) -> Tensor:
    """Invert pixels at or above a threshold going from 256/255 (nothing) down to 0 (everything)."""
    thr = (256.0 / 255.0) * (1 - v.abs()).view(-1, 1, 1, 1)
    return torch.where(x >= thr, 1 - x, x)


def _ra_sharpness(x: Tensor, v: Tensor) -> Tensor:
    """PIL sharpness: blend with the 3x3 smoothed image (borders kept), factor 0.1..1.9."""
    c = x.shape[1]
    k = torch.ones(3, 3, device=x.device, dtype=x.dtype)
    k[1, 1] = 5.0
    smooth = F.conv2d(x, (k / 13).expand(c, 1, 3, 3), padding=1, groups=c)
    smooth[..., 0, :], smooth[..., -1, :] = x[..., 0, :], x[..., -1, :]
    smooth[..., :, 0], smooth[..., :, -1] = x[..., :, 0], x[..., :, -1]
    return _blend(x, smooth, 1 + 0.9 * v)


_RA_OPS: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (
    _ra_autocontrast,
    lambda x, v: (x * (1 + 0.9 * v).view(-1, 1, 1, 1)).clamp_(0.0, 1.0),  # brightness
    lambda x, v: _blend(x, _grey(x), 1 + 0.9 * v),  # color (saturation)
    lambda x, v: _blend(x, _grey(x).mean((1, 2, 3), keepdim=True), 1 + 0.9 * v),  # contrast
    lambda x, v: equalize(x),
    _ra_posterize,
    _ra_rotate,
    _ra_sharpness,
    _ra_shear(0),
    _ra_shear(1),
    _ra_solarize,
    _ra_translate(0),
    _ra_translate(1),
)


def _rand_augment(x: Tensor, num_ops: int = 2) -> Tensor:
    """RandAugment with an op and a signed magnitude in [-1, 1] drawn per sample and per round."""
    # kornia's auto.RandAugment draws the same ops (and a fixed magnitude) for the whole batch, so we group
    # samples by op instead: one sort + one host sync per round, then each op runs once on its own chunk.
    n = x.shape[0]
    for _ in range(num_ops):
        op = torch.randint(0, len(_RA_OPS), (n,), device=x.device)
        v = torch.rand(n, device=x.device) * torch.where(torch.rand(n, device=x.device) < 0.5, -1.0, 1.0)
        order = torch.argsort(op)
        counts = torch.bincount(op, minlength=len(_RA_OPS)).tolist()
        xs, vs = x.index_select(0, order).split(counts), v.index_select(0, order).split(counts)
        out = torch.cat([fn(xc, vc) for fn, xc, vc in zip(_RA_OPS, xs, vs, strict=True) if len(xc)])
        x = torch.empty_like(out).index_copy_(0, order, out)
    return x


def _cutout(x: Tensor, frac: float = 0.5) -> Tensor:
    """FixMatch CutoutAbs: grey square of side frac * size centred uniformly, clipped at the borders."""
    n, _, h, w = x.shape
    side = max(1, round(frac * min(h, w)))
    y0 = torch.randint(0, h, (n, 1), device=x.device) - side // 2
    x0 = torch.randint(0, w, (n, 1), device=x.device) - side // 2
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_r = (rows >= y0) & (rows < y0 + side)
    in_c = (cols >= x0) & (cols < x0 + side)
    return x.masked_fill((in_r[:, :, None] & in_c[:, None, :]).unsqueeze(1), _FILL)


# ---------------------------------------------------------------- module


class ViewPolicy(torch.nn.Module):
    """Random augmentation A(x): uint8 N x C x H x W -> float32 N x C x size x size, same device."""

    def __init__(self, policy: str, image_size: int, mean: Sequence[float], std: Sequence[float],
                 crop: bool = True) -> None:
        """Configure one of :data:`POLICIES` at output resolution ``image_size`` with normalisation stats.

        ``crop=False`` is the colour-only mode for batches that already are random-resized crops (streamed
        data): a cropping policy then only flips, jitters and greys them.
        """
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"unknown view policy {policy!r}; expected one of {', '.join(POLICIES)}")
        if int(image_size) != image_size or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean/std must have equal length and std > 0, got {mean!r} / {std!r}")
        self.policy, self.image_size, self.crop = policy, int(image_size), bool(crop)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        """Show the policy and size when printed."""
        return f"policy={self.policy!r}, image_size={self.image_size}" + ("" if self.crop else ", crop=False")

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Draw one random view per sample; views never need gradients, so this runs under no_grad."""
        x = _check_images(images).float() / 255
        size = self.image_size
        if self.mean.shape[0] not in (1, x.shape[1]):
            raise ValueError(f"{self.mean.shape[0]} mean/std values for {x.shape[1]}-channel images")
        if x.shape[0] == 0:
            return x.new_empty(0, x.shape[1], size, size)
        if self.policy in _CROP_SCALE and not self.crop:
            x = _random_grayscale(_color_jitter(_flip(_resize(x, size))))
        elif self.policy in _CROP_SCALE:
            x = _crop_flip(x, size, _CROP_SCALE[self.policy])
            x = _random_grayscale(_color_jitter(x))
        elif self.policy == "eval":
            x = _resize(x, size)
        else:
            x = _pad_crop_flip(_resize(x, size))
            if self.policy == "fixmatch-strong":
                x = _cutout(_rand_augment(x))
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        return ((x - mean) / std).contiguous()


def build_view_policy(
    policy: str, image_size: int, mean: Sequence[float], std: Sequence[float], crop: bool = True
) -> ViewPolicy:
    """Factory used by the training/eval code; unknown names raise ValueError listing :data:`POLICIES`."""
    if policy not in POLICIES:
        raise ValueError(f"unknown view policy {policy!r}; expected one of {', '.join(POLICIES)}")
    return ViewPolicy(policy, image_size, mean, std, crop)


def crop_scale(policy: str) -> tuple[float, float] | None:
    """The random-resized-crop area range of a cropping policy (None for the others), for crops made elsewhere."""
    return _CROP_SCALE.get(policy)
