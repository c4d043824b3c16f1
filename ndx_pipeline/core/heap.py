"""The process heap: glibc keeps freed memory, fragmented, across work that allocates and frees temporaries of
varying sizes (an extraction pass's activations; an in-process LLM's batches), and the resident size creeps up with
the amount of work, not its size at any moment. `release_freed_heap` hands the free pages back.
"""

from __future__ import annotations

_LIBC = None


def release_freed_heap() -> None:
    """Give the heap's free pages back to the operating system (glibc's malloc_trim, every arena; elsewhere nothing).

    Measured: an extraction pass without it, +30 % peak RSS from a 50k- to a 200k-token corpus; the LLM stages of
    one layer × 4 neurons without it, 3.7 GB peak (the simulations' batches fragmenting the heap), with it after every
    batch 1.9 GB, after every 4th simulation batch 2.4 GB."""
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 — not glibc: no trim
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)
