"""A ``concurrent.futures.Future`` that makes its Condition only when a thread waits.

``Future()`` builds a ``threading.Condition`` (an RLock and a handful of bound
methods, ~1.3 us) and every state change takes it. An executor running tens of
thousands of tiny tasks spends more on that than on the tasks, while most
futures are never waited on before they finish. Here the Condition is created
on first use, under one module lock; until then the few transitions the
executor makes (``set_running_or_notify_cancel``, ``set_result``,
``set_exception``) and ``add_done_callback`` run under that lock alone.

It stays a real Future: every other method, ``wait``, ``as_completed`` and
asyncio reach ``_condition``, which creates the Condition, and from then on
the base class's code runs unchanged. The two paths never race: a transition
takes the fast path only while no Condition exists, and no Condition can
appear while it holds the module lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import (
    CANCELLED,
    CANCELLED_AND_NOTIFIED,
    FINISHED,
    PENDING,
    RUNNING,
)
from typing import Any, TypeVar

__all__ = ["LazyFuture"]

T = TypeVar("T")

_DONE = frozenset((CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED))
# Guards the creation of every LazyFuture's Condition and the fast paths: held
# for a few bytecodes at a time, never while calling out.
_lock = threading.Lock()


class LazyFuture(Future[T]):
    """A Future whose Condition (and lists) are created by the first thread that needs one."""

    # Class-level defaults: a future nobody waits on stores only its state and outcome.
    _state: str = PENDING
    _cond: threading.Condition | None = None
    _waiter_list: list[Any] | None = None
    _callback_list: list[Callable[[Future[T]], object]] | None = None
    _result: Any = None
    _exception: BaseException | None = None

    def __init__(self) -> None:  # Future.__init__ would build the Condition
        pass

    @property
    def _condition(self) -> threading.Condition:
        cond = self._cond
        if cond is None:
            with _lock:
                cond = self._cond
                if cond is None:
                    cond = self._cond = threading.Condition()
        return cond

    @_condition.setter
    def _condition(self, cond: threading.Condition) -> None:
        self._cond = cond

    # The base class and wait()/as_completed() touch these lists only while
    # holding the Condition; the fast paths below only while none exists.
    @property
    def _waiters(self) -> list[Any]:
        if self._waiter_list is None:
            self._waiter_list = []
        return self._waiter_list

    @_waiters.setter
    def _waiters(self, waiters: list[Any]) -> None:
        self._waiter_list = waiters

    @property
    def _done_callbacks(self) -> list[Callable[[Future[T]], object]]:
        if self._callback_list is None:
            self._callback_list = []
        return self._callback_list

    @_done_callbacks.setter
    def _done_callbacks(self, callbacks: list[Callable[[Future[T]], object]]) -> None:
        self._callback_list = callbacks

    def _invoke_callbacks(self) -> None:
        if self._callback_list:
            super()._invoke_callbacks()  # type: ignore[misc]

    def done(self) -> bool:
        return self._state in _DONE

    def result(self, timeout: float | None = None) -> T:
        # FINISHED is final and _result/_exception are written before it.
        if self._state == FINISHED and self._exception is None:
            return self._result  # type: ignore[no-any-return]
        return super().result(timeout)

    def add_done_callback(self, fn: Callable[[Future[T]], object]) -> None:
        with _lock:
            if self._cond is None and self._state not in _DONE:
                self._done_callbacks.append(fn)
                return
        super().add_done_callback(fn)

    def set_running_or_notify_cancel(self) -> bool:
        _lock.acquire()  # (not ``with``: twice as fast, and this runs once per task)
        try:
            if self._cond is None and self._state == PENDING:
                self._state = RUNNING
                return True
        finally:
            _lock.release()
        return super().set_running_or_notify_cancel()

    def set_result(self, result: T) -> None:
        if not self._finish_fast(result, None):
            super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        if not self._finish_fast(None, exception):
            super().set_exception(exception)

    def _finish_fast(self, result: Any, exception: BaseException | None) -> bool:
        with _lock:
            if self._cond is not None:
                return False
            state = self._state
            if state not in _DONE:
                self._result = result
                self._exception = exception
                self._state = FINISHED
        if state in _DONE:  # (repr takes the lock, so not raised inside it)
            raise InvalidStateError(f"{state}: {self!r}")
        # No waiter can exist without the Condition, so only the callbacks remain.
        if self._callback_list:
            self._invoke_callbacks()
        return True

    def settle(self, ok: bool, value: Any) -> None:
        """Finish with ``value`` (a result if ``ok``, else an exception), for the executor.

        The fast path of set_result/set_exception in one call; a future already
        cancelled (or finished) ignores the outcome instead of raising.
        """
        if self.settle_now(ok, value):
            return
        try:
            if ok:
                super().set_result(value)
            else:
                super().set_exception(value)
        except InvalidStateError:
            pass

    def settle_now(self, ok: bool, value: Any) -> bool:
        """:meth:`settle` if no thread waits (no Condition yet); else return False."""
        _lock.acquire()
        try:
            if self._cond is not None:
                return False
            if self._state in _DONE:
                return True
            if ok:
                self._result = value
            else:
                self._exception = value
            self._state = FINISHED
        finally:
            _lock.release()
        if self._callback_list:
            self._invoke_callbacks()
        return True
