"""Length-prefixed frames over a pipe between a worker node and its task processes."""

from __future__ import annotations

import os
import threading

from fabric.remote._pipes import FrameReader, write_frame


def test_frames_of_several_parts_arrive_whole_even_past_the_pipe_buffer() -> None:
    r, w = os.pipe()
    big = os.urandom(1 << 20)  # far past the pipe's 64 KiB: written in pieces
    writer = threading.Thread(target=lambda: [write_frame(w, b"\1", big), write_frame(w, b"x")])
    writer.start()
    reader = FrameReader(r)
    try:
        assert reader.read() == b"\1" + big
        assert reader.read() == b"x"
    finally:
        writer.join(60)
        os.close(w)
    try:
        assert reader.read() is None  # the writer is gone
    finally:
        os.close(r)


def test_frames_read_together_come_back_one_at_a_time() -> None:
    r, w = os.pipe()
    reader = FrameReader(r)
    try:
        write_frame(w, b"a")
        write_frame(w, b"bc", memoryview(b"d"))
        write_frame(w)
        assert reader.read() == b"a"  # its read brought the other two frames as well
        assert reader.read() == b"bcd"
        assert reader.read() == b""
        os.close(w)
        assert reader.read() is None
    finally:
        os.close(r)
