"""Image tensor conversions shared by every system, metric and callback.

Story records and generated samples are uint8 NHWC `[N, H, W, 3]`; networks take float NCHW. torchvision's
`resize` with antialias does the same resampling for float input; the uint8 CPU kernel of `F.interpolate` is used
because it matches Pillow's fixed-point resize bit for bit, which the parity data depends on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["minus_one_one", "resize_uint8", "uint8_from_minus_one_one", "uint8_from_zero_one"]


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> uint8 [N, 3, size, size], antialiased bilinear like PIL's Resize."""
    x = images.permute(0, 3, 1, 2).contiguous()
    if tuple(x.shape[-2:]) == (size, size):
        return x
    if x.device.type == "cpu":  # torch's uint8 antialiased kernel matches Pillow's fixed-point resize
        return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)


def minus_one_one(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [..., 3, R, R] -> float in [-1, 1]."""
    return images.to(dtype).div(127.5).sub(1.0)


def uint8_from_zero_one(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [0, 1] (clamped) -> uint8 [N, H, W, 3]."""
    return images.float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def uint8_from_minus_one_one(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] in [-1, 1] (clamped) -> uint8 [N, H, W, 3]."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
