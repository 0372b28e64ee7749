"""Find the operations that make the host wait for the accelerator, on any device (CPU included).

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` raises at a synchronising call; CI has no
GPU. :class:`HostSyncRecorder` instead watches every aten operation and records the ones whose
result the host must read (a value turned into a Python number or bool, a shape that depends on
data) or that copy Python data to the device. A step that records none of them lets the GPU run
ahead of Python, on any device.
"""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operations whose output the host must wait for: a scalar read, or a data-dependent shape.
_SYNCING = {
    "aten::_local_scalar_dense",  # .item(), bool(), int(), float(), .tolist()
    "aten::is_nonzero",
    "aten::equal",
    "aten::nonzero",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::bincount",
    "aten::lift_fresh",  # torch.tensor(python data): a host-to-device copy on a GPU
}


def _bool_indexing(func, args) -> bool:
    name = func._schema.name
    if name not in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(torch.is_tensor(index) and index.dtype == torch.bool for index in indices or ())


def _unbounded_repeat(func, kwargs) -> bool:
    """``repeat_interleave`` with tensor repeats and no ``output_size``: its length is read on the host."""
    return (
        func._schema.name == "aten::repeat_interleave"
        and func._overloadname == "Tensor"
        and kwargs.get("output_size") is None
    )


class HostSyncRecorder(TorchDispatchMode):
    """Context manager recording ``(operation, where)`` for every host-syncing operation run inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in _SYNCING or _bool_indexing(func, args) or _unbounded_repeat(func, kwargs):
            frames = [frame for frame in traceback.extract_stack()[:-1] if "torch/" not in frame.filename]
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
            self.syncs.append((name, where))
        return func(*args, **kwargs)
