"""The task runner without any network: what a task process does with one payload."""

from __future__ import annotations

import os
import pickle
import sys

import cloudpickle

from fabric.remote._errors import RemoteError
from fabric.remote._runner import TaskRunner, decode_outcome, encode_function, encode_task

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def square(x: int) -> int:
    return x * x


def make_local_class() -> object:
    class Local:
        value = 3

    return Local()


def run(runner: TaskRunner, fn: object, *args: object, **kwargs: object) -> object:
    _, blob = runner.run(encode_task(encode_function(fn), args, kwargs))  # type: ignore[arg-type]
    return decode_outcome(blob).value


def test_functions_sent_by_reference_are_plain_pickles_and_the_rest_travel_by_value() -> None:
    assert pickle.loads(encode_function(abs)) is abs
    assert pickle.loads(encode_function(os.path.join)) is os.path.join
    assert encode_function(square) == cloudpickle.dumps(square, protocol=5)  # registered by value
    bound = [1].count  # a builtin bound to an object is not a module's: cloudpickle sends it
    assert encode_function(bound) == cloudpickle.dumps(bound, protocol=5)


def test_plain_arguments_take_the_c_pickler_and_the_rest_travel_by_value() -> None:
    blob = encode_function(abs)
    for args, many in [((5,), False), (((1, "a", None, 2.5, b"x", True, 1j),), True)]:
        expected = cloudpickle.dumps((blob, args, None, False, many), protocol=5)
        assert encode_task(blob, args, many=many) == expected
    # a function or class among the arguments (or in kwargs) still travels by value
    local = make_local_class()
    task = encode_task(blob, (square, (local,)), {"f": square})
    assert task == cloudpickle.dumps((blob, (square, (local,)), {"f": square}, False, False))
    _, args, kwargs, _, _ = pickle.loads(task)
    assert args[0](3) == kwargs["f"](3) == 9 and args[1][0].value == 3


def test_results_made_in_the_task_come_back_by_value() -> None:
    runner = TaskRunner()
    assert run(runner, square, 7) == 49
    assert run(runner, lambda: lambda: 5)() == 5  # type: ignore[operator]
    assert run(runner, make_local_class).value == 3  # type: ignore[attr-defined]
    assert run(runner, pow, 2, 5, mod=7) == 4


def test_a_chunk_runs_every_call_and_the_cached_function_follows_the_payload() -> None:
    runner = TaskRunner()
    blob = encode_function(square)
    for chunk in (((1,), (2,)), ((3,),)):
        ok, out = runner.run(encode_task(blob, chunk, many=True))
        assert ok and decode_outcome(out).value == [x * x for (x,) in chunk]
    assert run(runner, abs, -4) == 4  # another function: not the cached one


def test_errors_and_unpicklable_results_come_back_as_errors() -> None:
    runner = TaskRunner()
    error, tb_text = run(runner, int, "x")  # type: ignore[misc]
    assert isinstance(error, ValueError) and "Traceback" in tb_text
    unpicklable = run(runner, lambda: iter(os.scandir(".")))
    problem, _ = unpicklable  # type: ignore[misc]
    assert isinstance(problem, pickle.PicklingError) and "cannot be pickled" in str(problem)


class Unpicklable(Exception):
    def __reduce__(self) -> object:
        raise TypeError("no")


def test_an_exception_that_will_not_pickle_becomes_a_remote_error() -> None:
    def boom() -> None:
        raise Unpicklable("boom")

    error, tb_text = run(TaskRunner(), boom)  # type: ignore[misc]
    assert isinstance(error, RemoteError) and error.type_name == "Unpicklable"
    assert "boom" in tb_text


def test_output_is_captured_only_when_asked() -> None:
    runner = TaskRunner()
    ok, blob = runner.run(encode_task(encode_function(print), ("hi",), capture=True))
    assert ok and decode_outcome(blob).stdout == "hi\n"
    ok, blob = runner.run(encode_task(encode_function(print), ("hi",)))
    assert ok and decode_outcome(blob).stdout == ""
