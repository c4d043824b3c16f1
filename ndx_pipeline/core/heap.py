"""The process heap: glibc keeps freed memory, fragmented, across work that allocates and frees temporaries of
varying sizes (an extraction pass's activations; an in-process LLM's batches), and the resident size creeps up with
the amount of work, not its size at any moment. `release_freed_heap` hands the free pages back; `reuse_freed_heap`
keeps a forward pass's freed activations for the next batch instead of mapping fresh pages for each.
"""

from __future__ import annotations

_LIBC = None


# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_FROM = 32 * 2**20  # the largest threshold glibc accepts on 64-bit
TRIM_FROM = 64 * 2**20


def reuse_freed_heap() -> None:
    """Serve blocks of up to 32 MiB from the heap and keep up to 64 MiB of free memory at its top for reuse (glibc;
    elsewhere nothing), for the rest of the process; `release_freed_heap` still hands everything free back.

    By default glibc maps a large block on its own and unmaps it when freed, and trims the heap's top as soon as
    128 KiB of it is free, raising both limits only as it sees large blocks freed. A forward pass frees and allocates
    its batch's activations (~6 MiB each for the bundled model) every layer, so in a fresh process each batch touches
    new pages: measured on the bundled model, 12k tokens, all 30 layers, both signs, 2-core CPU, a bare forward takes
    390k–530k page faults (~10 % of its time) and an extraction pass 0.57–1.0M; with these limits the pass takes
    0.41–0.45M, about the first touch of its kept windows (1.5 GB), and is 2.6 % faster (three runs each); over 30k
    tokens the pass takes the same time either way (glibc has raised its limits itself by then), while a bare forward
    in a fresh process goes from 31.1–31.3 s to 26.5–28.0 s. `benchmarks/activations.py` sets these limits before
    timing any forward, so that its bare forwards and the pipeline run under the same allocator."""
    libc = _libc()
    if libc:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_FROM)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_FROM)


def _libc():
    """glibc, or False elsewhere (no malloc_trim)."""
    import ctypes
    import ctypes.util

    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018 — not glibc: no trim
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def release_freed_heap() -> None:
    """Give the heap's free pages back to the operating system (glibc's malloc_trim, every arena; elsewhere nothing).

    Measured: an extraction pass without it, +30 % peak RSS from a 50k- to a 200k-token corpus; the LLM stages of
    one layer × 4 neurons without it, 3.7 GB peak (the simulations' batches fragmenting the heap), with it after every
    batch 1.9 GB, after every 4th simulation batch 2.4 GB."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)
