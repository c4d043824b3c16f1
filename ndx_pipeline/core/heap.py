"""The process heap: glibc keeps freed memory, fragmented, across work that allocates and frees temporaries of
varying sizes (an extraction pass's activations; an in-process LLM's batches), and the resident size creeps up with
the amount of work, not its size at any moment. `release_freed_heap` hands the free pages back; `reuse_freed_heap`
keeps a forward pass's freed activations for the next batch instead of mapping fresh pages for each;
`keep_polars_freed_pages` does the same for polars' own allocator.
"""

from __future__ import annotations

import os

_LIBC = None

# polars' allocator (its own jemalloc) reads its settings from this variable once, when polars is first imported
POLARS_ALLOCATOR_SETTINGS = "_RJEM_MALLOC_CONF"
POLARS_KEEPS_FREED = "dirty_decay_ms:5000,muzzy_decay_ms:5000"


def keep_polars_freed_pages() -> None:
    """Have polars keep memory it frees for 5 s before handing the pages back to the OS (its build's default: freed
    pages 0.5 s, pages already released lazily 1 s), unless the process has set `_RJEM_MALLOC_CONF` itself.
    It takes effect in a process that imports polars after it (the package root calls it first thing) and in the
    child processes it starts (Dagster's step and run workers), whatever this one had imported before.

    Why: after an extraction pass, each layer's records and excerpts are built, gathered and written (≈ 1 s of work
    per layer on each of two threads), and with polars' default the pages of one layer's frames are back with the OS
    before the next layer asks for as much again, so each layer faults them in afresh. Measured on the whole-model
    materialization (30 layers, both signs, bundled corpus, 2-core VM, two runs each): after the pass 829k and 854k
    page faults, 15.6 and 14.3 s of system time, 22.8 and 21.9 s; with this 373k and 353k, 11.8 and 10.4 s, 20.5 and
    19.8 s (`benchmarks/activations.py`: 1.34–1.36× the bare forward before, 1.25–1.29× with it). On this VM a page
    the OS took back is also slow to get again (the hypervisor reclaims free guest memory: writing 1.5 GB into fresh
    page cache runs at 0.7–0.8 GB/s, into pages just freed at 4.9 GB/s)."""
    os.environ.setdefault(POLARS_ALLOCATOR_SETTINGS, POLARS_KEEPS_FREED)


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
