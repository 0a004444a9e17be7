"""Decode several videos (or parts of one) at once, hand their windows on in input order.

One PyAV decode is bound by one video's frame threading, which scales poorly (threads hand frames to
each other, and a small frame gives each little to do); decodes side by side use the cores fully.
The consumer still sees exactly the sequential order: all of video 0's events, then video 1's, ...
so encoder batches, store rows and failures.jsonl are the same as with one worker, whatever the
thread timing. Memory stays bounded: each video in flight has its own queue of `depth` items, a
worker whose queue is full waits while the consumer drains the videos before it, and at most `ahead`
videos are in flight at once (started and not yet consumed to their end). Without that cap, while one
worker decoded a long video that could not be cut into parts (MPEG-TS), the others ran through every
later short video, each holding its windows until the consumer got there (2102 windows held, 840 MB,
on 2000 short videos behind one 3-hour one).
"""
from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from typing import Callable, Iterable, Iterator

log = logging.getLogger(__name__)
_END = object()


class _Raised:
    """An exception from a worker, re-raised in the consumer at the item it belongs to."""

    def __init__(self, err: BaseException):
        self.err = err


def usable_cpus() -> int:
    """CPUs this process may run on (a container's or taskset's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_decode_workers(cpus: int | None = None) -> int:
    """Decodes run side by side when the user does not say: one per CPU, at most 16. Measured on 2 cores
    (1080p H.264): two single-threaded decodes gave 2.4x one single-threaded decode and 1.7x one decode
    with FFmpeg's frame threads, which pay for handing frames between threads. On an H200 host with 16
    cores (camera-like 1080p H.264, bench/extract.py): 16 at once ran end to end at 61.6-62.9x realtime,
    8 at once at 48.6-50.8x. Each worker buffers up to one part (a batch of preprocessed windows), hence
    a cap."""
    cpus = usable_cpus() if cpus is None else cpus
    return max(1, min(16, cpus))


def ordered_parallel(items: Iterable, produce: Callable[[object], Iterator], workers: int = 1,
                     depth: int = 8, ahead: int | None = None) -> Iterator:
    """Yield everything `produce(item)` yields, for each item in `items` order, running up to `workers`
    of those generators at once in threads, and at most `ahead` items (default 2 x workers) in flight:
    started and not yet consumed to their end. An exception from `items` or from a generator is raised
    here at its place in the order. Closing this generator early stops the workers (each closes its
    generator, releasing open files) and closes `items` before it returns."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    ahead = 2 * workers if ahead is None else ahead
    if ahead < workers:
        raise ValueError(f"ahead must be >= workers ({workers}), got {ahead}")
    # One permit per item in flight: taken before a worker takes an item, given back when the consumer
    # has had the item's last event. The consumer's item always has its permit, so it always progresses.
    in_flight = threading.Semaphore(ahead)
    source = iter(items)
    take = threading.Lock()          # pulls from `source` and numbers the item in one step
    ready = threading.Condition()    # a new slot, or the end of `source`
    slots: dict[int, queue.Queue] = {}
    state = {"next": 0, "total": None, "source_closed": False}
    stop = threading.Event()

    def put(q: queue.Queue, item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def acquire_take() -> bool:
        # A worker waiting for its turn at the input notices `stop` (a plain acquire would keep it until
        # the worker inside the input gets its item, which can take as long as a probe).
        while not stop.is_set():
            if take.acquire(timeout=0.1):
                return True
        return False

    def close_source():  # holding `take`: no worker is inside the input
        if not state["source_closed"]:
            state["source_closed"] = True
            getattr(source, "close", lambda: None)()

    def open_slot() -> queue.Queue:
        q: queue.Queue = queue.Queue(maxsize=depth)
        with ready:
            slots[state["next"]] = q
            state["next"] += 1
            ready.notify_all()
        return q

    def acquire_permit() -> bool:
        while not stop.is_set():
            if in_flight.acquire(timeout=0.1):
                return True
        return False

    def work():
        while acquire_permit():
            if not acquire_take():
                return
            try:  # numbering under the lock: slot k always holds the k-th item
                if stop.is_set():
                    close_source()
                    return
                try:
                    item = next(source)
                except StopIteration:
                    in_flight.release()  # no item taken
                    with ready:
                        state["total"] = state["next"]
                        ready.notify_all()
                    return
                except BaseException as err:  # noqa: BLE001 - the input itself failed: raised in order
                    q = open_slot()
                    with ready:
                        state["total"] = state["next"]
                        ready.notify_all()
                    put(q, _Raised(err))
                    return
                if stop.is_set():
                    # The consumer stopped while this item was coming: start nothing more, and close the
                    # input, which the consumer could not do while this worker was inside it.
                    close_source()
                    return
                q = open_slot()
            finally:
                take.release()
            gen = None
            try:
                gen = produce(item)
                for out in gen:
                    if not put(q, out):
                        return
            except BaseException as err:  # noqa: BLE001 - re-raised in the consumer at this item
                put(q, _Raised(err))
                return
            finally:
                getattr(gen, "close", lambda: None)()
            if not put(q, _END):
                return

    threads = [threading.Thread(target=work, daemon=True, name=f"lvmae-decode-{k}") for k in range(workers)]
    for t in threads:
        t.start()
    try:
        k = 0
        while True:
            with ready:
                while k not in slots and (state["total"] is None or k < state["total"]):
                    # A worker that died outside its try (it cannot) would hang us: wake up to check.
                    ready.wait(timeout=0.5)
                    if not any(t.is_alive() for t in threads) and k not in slots:
                        break
                q = slots.pop(k, None)
            if q is None:
                return
            while True:
                out = q.get()
                if out is _END:
                    break
                if isinstance(out, _Raised):
                    raise out.err
                yield out
            in_flight.release()   # item k consumed to its end: another may start
            k += 1
    finally:
        stop.set()
        deadline = time.monotonic() + 2.0  # a worker notices `stop` within 0.1 s of its next put
        for t in threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        # The input may be a generator with work of its own (probing ahead in a thread): close it too,
        # under the lock, so that no worker is inside it. A worker still inside it closes it when its
        # item comes (above).
        if take.acquire(timeout=max(0.0, deadline - time.monotonic())):
            try:
                close_source()
            finally:
                take.release()


def lower_thread_priority(by: int) -> bool:
    """Raise the calling thread's nice value by `by` (at most 19). On Linux nice is a per-thread value
    that threads started afterwards inherit, FFmpeg's frame threads included; raising it needs no
    privilege (lowering it again does). False where threads cannot be niced apart (not Linux)."""
    if by <= 0 or not sys.platform.startswith("linux"):
        return False
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except OSError as err:  # a sandbox that filters the call: run at the usual priority
        log.warning("could not lower a decode thread's priority (%s)", err)
        return False
    return True


def in_background(produce: Callable[[], Iterator], maxsize: int = 4, nice: int = 0) -> Iterator:
    """Yield what `produce()` yields, produced in a daemon thread of its own (decode overlaps the encoder;
    PyAV and torch drop the GIL), holding up to `maxsize` items ahead. When the consumer stops early (an
    error, close()), the thread stops too and closes the generator. `nice` > 0: the thread's nice value
    is raised by that much before it starts (lower_thread_priority; a fresh thread, since a pool's
    thread could not take its priority back)."""
    def run(_):
        lower_thread_priority(nice)
        yield from produce()

    return ordered_parallel([None], run, workers=1, depth=maxsize)
