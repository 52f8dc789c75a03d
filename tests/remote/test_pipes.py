"""Length-prefixed frames over a pipe between a worker node and its task processes."""

from __future__ import annotations

import os
import threading

from fabric.remote._pipes import read_frame, write_frame


def test_frames_of_several_parts_arrive_whole_even_past_the_pipe_buffer() -> None:
    r, w = os.pipe()
    big = os.urandom(1 << 20)  # far past the pipe's 64 KiB: written in pieces
    writer = threading.Thread(target=lambda: [write_frame(w, b"\1", big), write_frame(w, b"x")])
    writer.start()
    try:
        assert read_frame(r) == b"\1" + big
        assert read_frame(r) == b"x"
    finally:
        writer.join(60)
        os.close(w)
    try:
        assert read_frame(r) is None  # the writer is gone
    finally:
        os.close(r)
