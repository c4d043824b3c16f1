"""The asset bodies' shared plumbing: `ahead` prepares layers on worker threads, two at a time, and hands them back
in order; an error is raised at its layer."""

import threading

import pytest

from ndx_pipeline.defs.materialize import LAYERS_AHEAD, ahead


def test_ahead_prepares_two_at_a_time_and_yields_in_order():
    """Layers 0 and 1 can only finish if both are in flight at once (a barrier of two), and layer 0 only after
    layer 1 (an event): no timing decides the outcome; with one at a time the barrier breaks and the test fails."""
    lock, running, most, prepared = threading.Lock(), [0], [0], []
    both, one_done = threading.Barrier(2, timeout=10), threading.Event()

    def prepare(layer):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        if layer in (0, 1):
            both.wait()
        if layer == 0:
            assert one_done.wait(10)
        with lock:
            running[0] -= 1
            prepared.append(layer)
        if layer == 1:
            one_done.set()
        return layer * 10

    got = list(ahead(range(7), prepare))
    assert got == [(layer, layer * 10) for layer in range(7)]
    assert most[0] == LAYERS_AHEAD == 2  # two layers really were in flight at once, never more
    assert prepared[:2] == [1, 0]  # they finished out of order and were still handed back in order


def test_ahead_raises_an_error_at_its_item_and_prepares_little_after_it():
    prepared = []

    def prepare(layer):
        prepared.append(layer)
        if layer == 2:
            raise ValueError("layer 2 is bad")
        return layer

    seen = []
    with pytest.raises(ValueError, match="layer 2 is bad"):
        for layer, _ in ahead(range(10), prepare):
            seen.append(layer)
    assert seen == [0, 1]
    assert max(prepared) <= 2 + LAYERS_AHEAD  # the layers far after the bad one were never started
