"""The pipeline's hand-offs: the fan-out queue as a work queue, the ordered window, and the CPU count."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import pytest

from update_engine.payload.pipeline import FanOut, OrderedWindow, Stopped, cpu_limit


def test_workers_sharing_one_place_each_get_an_item_once_and_all_see_the_end() -> None:
    queue: FanOut[int] = FanOut(0)
    taken: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        while (item := queue.get()) is not None:
            with lock:
                taken.append(item)

    workers = [threading.Thread(target=worker) for _ in range(3)]
    for thread in workers:
        thread.start()
    for item in range(200):
        assert queue.put(item, 0)
    queue.finish()
    for thread in workers:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in workers)
    assert sorted(taken) == list(range(200))


def test_the_window_hands_pieces_out_in_job_order_whatever_order_they_come_in() -> None:
    window: OrderedWindow[str] = OrderedWindow(budget=100)
    consumed: list[str] = []
    seqs = [window.reserve(10, on_consumed=functools.partial(consumed.append, f"job {n}")) for n in range(3)]
    window.add(seqs[2], "c1")
    window.done(seqs[2])
    window.add(seqs[1], "b1")
    window.add(seqs[0], "a1")
    window.add(seqs[1], "b2")
    window.done(seqs[1])
    window.add(seqs[0], "a2")
    window.done(seqs[0])
    window.finish()
    out = []
    while (piece := window.get()) is not None:
        out.append(piece)
        # A job's buffers go back only once the consumer is done with its last piece.
        if piece == "a2":
            assert consumed == []
        if piece == "b1":
            assert consumed == ["job 0"]
    assert out == ["a1", "a2", "b1", "b2", "c1"]
    assert consumed == ["job 0", "job 1", "job 2"]


def test_a_reservation_waits_for_room_and_a_big_job_goes_alone() -> None:
    window: OrderedWindow[str] = OrderedWindow(budget=100)
    first = window.reserve(60)
    reserved = threading.Event()
    seqs: list[int] = []

    def reserve_big() -> None:
        seqs.append(window.reserve(250))  # larger than the budget: waits until nothing else is held
        reserved.set()

    thread = threading.Thread(target=reserve_big)
    thread.start()
    assert not reserved.wait(0.2)
    window.add(first, "x")
    window.done(first)
    assert window.get() == "x"
    assert not reserved.is_set()  # the consumer has not moved past job 0 yet
    getter = threading.Thread(target=window.get)  # moving on releases job 0, then waits for job 1's pieces
    getter.start()
    assert reserved.wait(30)
    window.add(seqs[0], "big")
    window.done(seqs[0])
    getter.join(timeout=30)
    thread.join(timeout=30)
    assert seqs == [1]


def test_stop_wakes_every_waiter() -> None:
    window: OrderedWindow[str] = OrderedWindow(budget=10)
    window.reserve(10)
    errors: list[BaseException] = []

    def wait(call: Callable[[], object]) -> None:
        try:
            call()
        except Stopped as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wait, args=(lambda: window.reserve(5),)),
               threading.Thread(target=wait, args=(window.get,))]
    for thread in threads:
        thread.start()
    window.stop()
    for thread in threads:
        thread.join(timeout=30)
    assert len(errors) == 2
    with pytest.raises(Stopped):
        window.add(0, "late")


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "expected"),
    [
        (8, [], 8),
        (8, ["max 100000\n"], 8),
        (8, ["150000 100000\n", "max 100000"], 2),  # CPUQuota=150%: two CPUs to keep busy
        (8, ["max 100000", "50000 100000"], 1),  # a parent slice's quota counts too
        (2, ["800000 100000"], 2),  # the affinity is the smaller
        (4, ["garbage", ""], 4),
    ],
)
def test_cpu_limit(affinity: int, cpu_max: list[str], expected: int) -> None:
    assert cpu_limit(affinity, cpu_max) == expected


def test_a_passed_jobs_callback_runs_even_while_the_consumer_waits_for_the_next_job() -> None:
    """The producer may be waiting for what the callback frees before it can reserve the next job."""
    window: OrderedWindow[bytes] = OrderedWindow(budget=10)
    freed = threading.Event()
    seq = window.reserve(4, freed.set)
    window.add(seq, b"data")
    window.done(seq)
    got: list[bytes | None] = []
    consumer = threading.Thread(target=lambda: got.extend([window.get(), window.get()]), daemon=True)
    consumer.start()
    assert freed.wait(10), "the callback waited for a job that waited for it"
    window.finish()
    consumer.join(10)
    assert got == [b"data", None]
