"""Progress lines: the rate and time left come from the work after the warm-up, and say so while they cannot yet."""

from ndx_pipeline.core.progress import Progress


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_slow_first_item_does_not_make_the_time_left_a_guess():
    """A model that loads for a minute, then answers one item a second: the first line does not promise an hour
    (it said "ETA 61.0 min" for 4 minutes of work before), and the next ones measure the items that came after."""
    clock, lines = Clock(), []
    progress = Progress("explanations", 240, lines.append, unit="requests", every_s=0, clock=clock)
    clock.now = 60.0
    progress.advance()
    assert lines[-1] == "explanations: 1/240 requests (estimating the rate and time left)"
    for _ in range(9):
        clock.now += 1.0
        progress.advance()
    assert lines[-1] == "explanations: 10/240 requests (1 requests/s, ETA 3.8 min)"
    for _ in range(230):
        clock.now += 1.0
        progress.advance()
    assert lines[-1] == "explanations: 240/240 requests in 5.0 min (0.803 requests/s)"


def test_running_counts_and_work_that_grows():
    clock, lines = Clock(), []
    progress = Progress("activations", 1000, lines.append, unit="tokens", every_s=10, clock=clock)
    clock.now = 2.0
    progress.set(100)  # the first report: the warm-up ends here
    assert lines == []  # within every_s of the start: nothing said yet
    clock.now = 12.0
    progress.set(600)
    assert lines[-1] == "activations: 600/1000 tokens (50 tokens/s, ETA 8 s)"
    progress.expect(500)
    clock.now = 22.0
    progress.set(1100)
    assert lines[-1] == "activations: 1100/1500 tokens (50 tokens/s, ETA 8 s)"
    progress.set(1500)
    assert lines[-1] == "activations: 1500/1500 tokens in 22 s (68.2 tokens/s)"
