"""The journal: commits replay, torn tails are cut, compaction keeps the live set."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fabric.broker.journal import Journal, JournalError

S = b"s" * 16


def test_committed_submits_replay_in_order_without_the_done_ones(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with Journal(path, fsync="always") as j:
        assert j.replay() == ([], [])
        j.submit(S, b"1", {"runtime": "py3.11"}, (b"a", memoryview(b"b")), user="K")
        j.submit(S, b"2", {}, ())
        j.submit(S, b"3", {}, (b"c",))
        j.commit()
        j.done(S + b"2")
        j.commit()
    live, forgotten = Journal(path).replay()
    assert [(e.task, e.requires, e.payload, e.user) for e in live] == [
        (b"1", {"runtime": "py3.11"}, (b"a", b"b"), "K"),
        (b"3", {}, (b"c",), ""),
    ]
    assert forgotten == [S + b"2"]


def test_uncommitted_records_are_not_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "j"
    j = Journal(path, fsync="never")
    j.submit(S, b"1", {}, ())
    assert Journal(path).replay() == ([], [])
    j.close()  # close commits
    assert [e.task for e in Journal(path).replay()[0]] == [b"1"]


@given(cut=st.integers(1, 200))
@settings(max_examples=50, deadline=None)
def test_a_torn_tail_is_cut_off_and_earlier_records_survive(
    tmp_path_factory: pytest.TempPathFactory, cut: int
) -> None:
    path = tmp_path_factory.mktemp("torn") / "j"
    with Journal(path, fsync="never") as j:
        j.submit(S, b"kept", {}, (b"x" * 50,))
        j.commit()
        good = path.stat().st_size
        j.submit(S, b"torn", {}, (b"y" * 100,))
    data = path.read_bytes()
    path.write_bytes(data[: max(good, len(data) - cut)])
    live, _ = Journal(path).replay()
    assert [e.task for e in live] == [b"kept"]
    assert path.stat().st_size == good  # the torn bytes were truncated
    with Journal(path) as j:  # and appending after the cut works
        j.submit(S, b"next", {}, ())
    assert [e.task for e in Journal(path).replay()[0]] == [b"kept", b"next"]


def test_a_corrupt_record_stops_replay_there(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with Journal(path) as j:
        j.submit(S, b"1", {}, (b"aaaa",))
        j.commit()
        j.submit(S, b"2", {}, (b"bbbb",))
    data = bytearray(path.read_bytes())
    data[-2] ^= 0xFF  # flip a payload byte of the second record: its CRC fails
    path.write_bytes(bytes(data))
    assert [e.task for e in Journal(path).replay()[0]] == [b"1"]


def test_compaction_keeps_exactly_the_live_tasks(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with Journal(path, fsync="never") as j:
        for i in range(3000):
            j.submit(S, b"%d" % i, {}, (b"p" * 10,))
            if i % 10:
                j.done(S + b"%d" % i)
            j.commit()
        size = path.stat().st_size
    assert size < 3000 * 30  # compacted: dead records were dropped
    live, _ = Journal(path).replay()
    assert [e.task for e in live] == [b"%d" % i for i in range(0, 3000, 10)]


def test_not_a_journal_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j"
    path.write_bytes(b"something else")
    with pytest.raises(JournalError, match="not a fabric journal"):
        Journal(path)


def test_bad_fsync_policy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fsync must be"):
        Journal(tmp_path / "j", fsync="sometimes")  # type: ignore[arg-type]
