"""Weights in 2 MB pages: a decode step streams every weight once, and in 4 KB pages it also walks
a page table entry every 4 KB.

Linux gives anonymous memory transparent huge pages only where asked (`madvise`, the usual setting
of /sys/kernel/mm/transparent_hugepage/enabled), and torch does not ask. On a 2-vCPU AMD EPYC,
our kernels streamed one decode's weights 11-17 % faster from 2 MB pages, and the compiled int8
decode step ran 12-19 % faster, each against the same weights copied into 4 KB pages in the same
process (docs/benchmarks.md, sixteenth round). llama.cpp maps its GGUF file, whose page cache the
kernel may already hold in large pages.

`place_in_huge_pages(model)` copies each large parameter and buffer into its own mapping that
starts on a 2 MB boundary and is advised MADV_HUGEPAGE before it is first touched, one at a time
(the peak is the model plus its largest tensor); `zeros` makes a KV cache's layers the same way.
Where that is not possible (not Linux, huge pages off, madvise refused) tensors stay where they
are: the math is the same either way.
"""

from __future__ import annotations

import ctypes
import mmap

import torch
from torch import nn

HUGE_PAGE = 2 << 20


def huge_page_empty(shape, dtype: torch.dtype) -> torch.Tensor | None:
    """A CPU tensor of `shape` and `dtype` in fresh anonymous memory (it reads as zeros) that starts
    on a 2 MB boundary, advised MADV_HUGEPAGE; None below 2 MB or where that is not possible.

    The memory is its own mapping rather than torch's allocator's: malloc hands out memory that
    freed tensors left behind, already in 4 KB pages, and advice does not change pages that exist.
    Nothing is resident until written; the mapping goes when the tensor's storage does."""
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        memory = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
        start = -address % HUGE_PAGE
        memory.madvise(mmap.MADV_HUGEPAGE, start - start % mmap.PAGESIZE, nbytes + start % mmap.PAGESIZE)
    except (OSError, ValueError):
        return None
    return torch.frombuffer(memory, dtype=torch.uint8, count=nbytes, offset=start).view(dtype).view(shape)


@torch.no_grad()
def place_in_huge_pages(model: nn.Module, min_bytes: int = HUGE_PAGE) -> int:
    """Move every CPU parameter and buffer of `model` of at least `min_bytes` into huge pages, in
    place (module docstring); returns the bytes moved. A tensor that shares its storage with another
    (a view) stays where it is, so that the two keep seeing the same memory."""
    tensors = {}  # storage address -> (tensor, [(module, name, is_parameter)])
    for module in model.modules():
        for table, is_parameter in ((module._parameters, True), (module._buffers, False)):
            for name, tensor in table.items():
                if tensor is None or tensor.device.type != "cpu":
                    continue
                entry = tensors.setdefault(tensor.untyped_storage().data_ptr(), (tensor, []))
                entry[1].append((module, name, is_parameter))
    moved = 0
    for tensor, places in tensors.values():
        nbytes = tensor.nbytes
        if nbytes < min_bytes or not tensor.is_contiguous() or tensor.untyped_storage().nbytes() != nbytes \
                or any((m._parameters if p else m._buffers)[n] is not tensor for m, n, p in places):
            continue  # small, a view, or storage shared between distinct tensors
        copy = huge_page_empty(tensor.shape, tensor.dtype)
        if copy is None:
            return moved
        copy.copy_(tensor)
        for module, name, is_parameter in places:
            if is_parameter:
                module._parameters[name].data = copy  # the Parameter object stays (tied weights keep their tie)
            else:
                module._buffers[name] = copy
        moved += nbytes
    return moved


def zeros(shape, device, dtype: torch.dtype) -> torch.Tensor:
    """torch.zeros(shape), in huge pages where it is a large CPU tensor (a KV cache's layers: decode
    at a long context reads them as it reads the weights)."""
    memory = huge_page_empty(shape, dtype) if torch.device(device).type == "cpu" else None
    return memory if memory is not None else torch.zeros(shape, device=device, dtype=dtype)  # fresh memory: zeros
