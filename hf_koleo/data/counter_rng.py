"""Counter-based random numbers: a pure function of ``(seed, epoch, sample, draw)``, batched on any device.

Every random choice of the augmentation (crop boxes, flips, colour jitter, blur, solarisation,
iBOT masks) is a uniform drawn here from a per-sample *key*. Nothing depends on the batch it
sits in, the number of processes or workers, the device, or how many batches came before, so a
run is reproducible and a resumed run sees exactly the views a straight run would have seen.
There is no generator state to checkpoint and no per-image ``torch.Generator``.

The hash is Chris Wellons' ``lowbias32`` on 32-bit values held in int64 tensors. Products are
split in 16-bit halves so no int64 operation ever overflows (signed overflow is undefined in C++).
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
# One salt per independent stream of draws, so crops, colours and masks never share numbers.
STREAMS = {"global_crops": 0x9E3779B9, "local_crops": 0x85EBCA6B, "masks": 0x27D4EB2F}


def _multiply32(values: torch.Tensor, constant: int) -> torch.Tensor:
    """``values * constant mod 2**32`` for ``values`` in ``[0, 2**32)`` without int64 overflow."""
    low, high = constant & 0xFFFF, constant >> 16
    return (values * low + (((values * high) & 0xFFFF) << 16)) & MASK32


def hash32(values: torch.Tensor) -> torch.Tensor:
    """A bijective mix of 32-bit values (int64 tensor in ``[0, 2**32)``) to 32-bit values."""
    values = values ^ (values >> 16)
    values = _multiply32(values, _MULTIPLIERS[0])
    values = values ^ (values >> 15)
    values = _multiply32(values, _MULTIPLIERS[1])
    return values ^ (values >> 16)


def hash32_int(value: int) -> int:
    """:func:`hash32` of one Python int, computed on the host (bit-identical to the tensor version)."""
    value &= MASK32
    value ^= value >> 16
    value = (value * _MULTIPLIERS[0]) & MASK32
    value ^= value >> 15
    value = (value * _MULTIPLIERS[1]) & MASK32
    return value ^ (value >> 16)


def sample_keys(seed: int, epoch: int, indices: torch.Tensor) -> torch.Tensor:
    """``(n,)`` int64 keys in ``[0, 2**32)``, one per sample index, distinct within an epoch."""
    base = hash32_int(hash32_int(seed) ^ (epoch & MASK32))
    return hash32((indices.to(torch.int64) & MASK32) ^ base)


def uniforms(keys: torch.Tensor, n_draws: int, stream: str) -> torch.Tensor:
    """``(n, n_draws)`` float32 uniforms in ``[0, 1)`` (24-bit resolution) for ``(n,)`` keys."""
    salted = hash32(keys.to(torch.int64) ^ STREAMS[stream])
    counters = torch.arange(n_draws, device=keys.device, dtype=torch.int64)
    bits = hash32((salted[:, None] + counters) & MASK32)
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))
