"""Find the operations that make the host wait for the accelerator, on any device (CPU included).

On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` raises at a synchronising call; CI has no
GPU. :class:`HostSyncRecorder` instead watches every aten operation and records the ones whose
result the host must read (a value turned into a Python number or bool, a shape that depends on
data), that copy Python data to the device, or that copy a tensor between the host and another device
without ``non_blocking`` (seen on any device but the CPU: the ``meta`` device stands in for a GPU in
the tests). A step that records none of them lets the GPU run ahead of Python, on any device.
"""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


def _blocking_copy(func, args, kwargs) -> str | None:
    """``"host-to-device"`` / ``"device-to-host"`` for a blocking copy between the host and another
    device (``.to(device)``, ``.cpu()``, ``copy_``), else None. Only a ``non_blocking`` copy lets the
    host run on; from pinned memory it is truly asynchronous (the data path pins what it sends)."""
    name = func._schema.name
    if name == "aten::_to_copy":
        source, target = args[0], kwargs.get("device")
        non_blocking = kwargs.get("non_blocking", False)
    elif name == "aten::copy_":
        target, source = args[0].device, args[1]
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    else:
        return None
    if non_blocking or target is None or not torch.is_tensor(source):
        return None
    source_host, target_host = source.device.type == "cpu", torch.device(target).type == "cpu"
    if source_host == target_host:
        return None
    return "host-to-device copy" if source_host else "device-to-host copy"


def _mixes_host_and_device(args, kwargs) -> bool:
    """An operation on device tensors that also takes a host tensor (not a 0-d scalar): the host data
    is copied to the device first, and the host waits (an index tensor made on the host, say)."""
    tensors = [leaf for leaf in tree_leaves((args, kwargs)) if torch.is_tensor(leaf)]
    on_host = any(tensor.device.type == "cpu" and tensor.dim() > 0 for tensor in tensors)
    return on_host and any(tensor.device.type != "cpu" for tensor in tensors)


def _device_type(leaf) -> str | None:
    """The device type of an operation's argument: a tensor's, or a ``device=`` argument's."""
    if torch.is_tensor(leaf):
        return leaf.device.type
    return leaf.type if isinstance(leaf, torch.device) else None


class HostSyncRecorder(TorchDispatchMode):
    """Context manager recording ``(operation, where)`` for every host-syncing operation run inside it.

    ``device``: the accelerator's device (``"meta"`` standing in for a GPU); operations on host tensors
    alone are then host work, not syncs. Default: every tensor counts as on the device (a CPU run).
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.syncs: list[tuple[str, str]] = []
        self.device_type = None if device is None else torch.device(device).type

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.device_type is not None and self.device_type not in map(_device_type, tree_leaves((args, kwargs))):
            return func(*args, **kwargs)  # host work: the accelerator is not involved
        name = func._schema.name
        copy = _blocking_copy(func, args, kwargs)
        if copy is None and _mixes_host_and_device(args, kwargs):
            copy = "mixed host and device"
        if name in _SYNCING or copy or _bool_indexing(func, args) or _unbounded_repeat(func, kwargs):
            name = f"{name} ({copy})" if copy else name
            frames = [frame for frame in traceback.extract_stack()[:-1] if "torch/" not in frame.filename]
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"
            self.syncs.append((name, where))
        return func(*args, **kwargs)
