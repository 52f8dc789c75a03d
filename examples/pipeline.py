"""A producer/consumer pipeline: Queues between stages, an Event to stop early.

A producer reads numbers, two workers square them, a collector sums them. The
``stop`` Event lets any stage end the pipeline; a ``None`` per worker marks the end.

Run: python examples/pipeline.py [count]
"""

import sys

from fabric.local import Event, Process, Queue

WORKERS = 2


def produce(count: int, out: Queue, stop: Event) -> None:
    for n in range(count):
        if stop.is_set():
            break
        out.put(n)
    for _ in range(WORKERS):
        out.put(None)


def square(inbox: Queue, out: Queue) -> None:
    while (n := inbox.get(timeout=60)) is not None:
        out.put(n * n)
    out.put(None)


def main(count: int) -> None:
    numbers, squares, stop = Queue(maxsize=1000), Queue(), Event()
    stages = [Process(target=produce, args=(count, numbers, stop), name="producer")]
    stages += [Process(target=square, args=(numbers, squares)) for _ in range(WORKERS)]
    for stage in stages:
        stage.start()
    total, finished = 0, 0
    while finished < WORKERS:
        item = squares.get(timeout=60)
        if item is None:
            finished += 1
        else:
            total += item
    for stage in stages:
        stage.join(timeout=60)
    expected = sum(n * n for n in range(count))
    assert total == expected, (total, expected)
    print(f"sum of squares below {count}: {total}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
