"""Actors without a thread of their own, and the future every actor here replies with.

An open file must be an actor — its node id, handle and position are its state alone, and
its messages are handled one at a time — but a thread per open file costs ~350 µs to
start and stop, and 10,000 open files would be 10,000 threads. An :class:`InlineActor` has
no thread: a message is handled by the thread that sends it, when the actor is idle;
otherwise it waits in the mailbox, and the thread that is running the actor handles it
before letting go. The actor's *turn* (a lock only ever tried, never waited for) is what
makes its state single-threaded: exactly one thread at a time runs its handlers, in the
order its messages arrived. No thread ever blocks on another's turn, so turns cannot
deadlock.

A handler that needs the device does not wait for it: it is a generator that *yields*
what it waits for — a :class:`Future` (a device request's, another actor's reply) — and
is resumed with the result as a message of its own (a continuation) when that completes,
on whichever thread completed it (usually the device actor's). So a caller's request
costs two thread hand-offs (caller → device, device → caller) whatever actors it passes
through, and an actor waiting for the device is not blocked: other messages are handled
meanwhile. ``exclusive = True`` actors (open files: a read must see the position the write
before it left) hold further messages until the running one has finished.

Handlers therefore never block: a thread running a handler may be the device's own, and
it would wait for itself. :meth:`Future.get` refuses to wait on a thread that is marked
as one that must not (:func:`mark_nonblocking`).

Built as pykka documents for new actor types: :class:`InlineActor` subclasses
``pykka.Actor`` and supplies its inbox, its futures and its start (``_create_actor_inbox``,
``_create_future``, ``_start_actor_loop``), and dispatches each message through the base
class's ``_handle_receive`` as pykka's own actor loop does — so ``tell``, ``ask``,
``stop``, ``on_start``, ``on_stop``, ``on_failure`` and ``on_receive`` behave as with any
pykka actor.
"""

from __future__ import annotations

import collections
import functools
import logging
import queue
import sys
import threading
from collections.abc import Callable, Generator
from typing import Any, ClassVar, Generic, TypeVar

import pykka

log = logging.getLogger(__name__)

__all__ = ["Future", "InlineActor", "Task", "done", "failed", "mark_nonblocking"]

T = TypeVar("T")

_local = threading.local()


def mark_nonblocking() -> None:
    """Mark the calling thread as one that must never wait on a :class:`Future` (a device
    thread: waiting there for a reply only it can harvest would hang forever)."""
    _local.nonblocking = True


class Future(pykka.Future[T], Generic[T]):
    """A pykka future that can also call back when it completes.

    ``add_done_callback(fn)``: ``fn(future)`` runs in the thread that completes it (at once
    if already done). Waiting is a lock acquire: cheaper than pykka's ThreadingFuture
    (a Condition) on the hot path, where every request makes one.
    """

    __slots__ = ("_callbacks", "_exc", "_mutex", "_state", "_value", "_waiter")

    def __init__(self) -> None:
        super().__init__()
        self._mutex = threading.Lock()
        self._waiter = threading.Lock()
        self._waiter.acquire()  # released once, when the future completes
        self._state = 0  # 0 pending, 1 value, 2 exception
        self._value: Any = None
        self._exc: BaseException | None = None
        self._callbacks: list[Callable[[Future[T]], None]] | None = None

    def __repr__(self) -> str:
        return f"<Future {('pending', 'done', 'failed')[self._state]}>"

    def done(self) -> bool:
        return self._state != 0

    def get(self, *, timeout: float | None = None) -> T:
        if self._get_hook is not None:
            return super().get(timeout=timeout)
        if not self._state:
            if getattr(_local, "nonblocking", False):
                raise RuntimeError("a device thread must never wait on a future")
            if not self._waiter.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
                raise pykka.Timeout(f"{timeout} seconds")
            self._waiter.release()  # let other waiters through too
        if self._state == 2:
            assert self._exc is not None
            raise self._exc
        return self._value  # type: ignore[no-any-return]

    def result_or_error(self) -> tuple[Any, BaseException | None]:
        """(value, None) or (None, exception) of a completed future, without raising."""
        return (None, self._exc) if self._state == 2 else (self._value, None)

    def set(self, value: T | None = None) -> None:
        self._complete(1, value, None)

    def set_exception(self, exc_info: Any = None) -> None:
        if exc_info is None:
            exc_info = sys.exc_info()
        exc = exc_info[1] if isinstance(exc_info, tuple) else exc_info
        if exc is None and isinstance(exc_info, tuple) and exc_info[0] is not None:
            exc = exc_info[0]()
        self._complete(2, None, exc)

    def fail(self, exc: BaseException) -> None:
        """Complete with ``exc``; ignored when already completed (first outcome wins)."""
        if not self._state:
            try:
                self._complete(2, None, exc)
            except queue.Full:
                pass

    def _complete(self, state: int, value: Any, exc: BaseException | None) -> None:
        with self._mutex:
            if self._state:
                raise queue.Full  # as pykka's futures: set once
            self._value, self._exc = value, exc
            self._state = state
            callbacks, self._callbacks = self._callbacks, None
        self._waiter.release()
        if callbacks:
            for fn in callbacks:
                _run_callback(fn, self)

    def add_done_callback(self, fn: Callable[[Future[T]], None]) -> None:
        with self._mutex:
            if not self._state:
                if self._callbacks is None:
                    self._callbacks = [fn]
                else:
                    self._callbacks.append(fn)
                return
        _run_callback(fn, self)


def _run_callback(fn: Callable[[Any], None], future: Any) -> None:
    try:
        fn(future)
    except Exception:
        log.exception("a future's callback failed")


def done(value: Any = None) -> Future[Any]:
    """A future that is already complete with ``value``."""
    f: Future[Any] = Future()
    f.set(value)
    return f


def failed(exc: BaseException) -> Future[Any]:
    """A future that has already failed with ``exc``."""
    f: Future[Any] = Future()
    f.fail(exc)
    return f


class Task:
    """A handler's generator, suspended while what it yielded is pending.

    ``reply`` gets the generator's return value (or its exception); ``waiting_on`` is the
    future it is suspended on (None while it runs)."""

    __slots__ = ("gen", "message", "reply", "waiting_on")

    def __init__(self, gen: Generator[Any, Any, Any], message: Any,
                 reply: pykka.Future[Any] | None) -> None:
        self.gen = gen
        self.message = message
        self.reply = reply
        self.waiting_on: Future[Any] | None = None


class _Inbox:
    """The mailbox of one inline actor: pykka's inbox protocol (``put``, ``get``,
    ``empty``) plus continuations, which go before new messages."""

    __slots__ = ("_actor", "_queue", "_resumes", "_turn")

    def __init__(self) -> None:
        self._queue: collections.deque[Any] = collections.deque()
        self._resumes: collections.deque[tuple[Task, Future[Any]]] = collections.deque()
        self._turn = threading.Lock()
        self._actor: InlineActor | None = None

    # pykka's inbox protocol (ActorRef.tell/ask put Envelopes here)
    def put(self, envelope: Any, /) -> None:
        self._queue.append(envelope)
        self.run()

    def get(self) -> Any:
        return self._queue.popleft()

    def empty(self) -> bool:
        return not self._queue

    def resume(self, task: Task, future: Future[Any]) -> None:
        self._resumes.append((task, future))
        self.run()

    def run(self) -> None:
        """Run the actor in this thread if nobody else is; otherwise whoever is will see
        what was just queued (they check again after letting go of the turn)."""
        actor = self._actor
        if actor is None:
            return  # not started yet: start() drains what came before
        while self._turn.acquire(blocking=False):
            try:
                actor._drain(self._queue, self._resumes)
            finally:
                self._turn.release()
            if not (self._resumes or (self._queue and actor._accepting())):
                return


class InlineActor(pykka.Actor):
    """A pykka actor run by the threads that send to it (see module doc).

    ``on_receive`` may return a value (the reply) or a generator (a task: see
    :class:`Task`); a task yields :class:`Future` objects and receives their results.
    """

    exclusive: ClassVar[bool] = False  # True: one task at a time, messages wait meanwhile

    @staticmethod
    def _create_actor_inbox() -> Any:
        return _Inbox()

    @staticmethod
    def _create_future() -> Future[Any]:
        return Future()

    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> pykka.ActorRef[Any]:
        """Create and start the actor. Unlike thread-backed pykka actors, inline actors
        are not registered in ``pykka.ActorRegistry``: whoever starts one owns it and
        stops it (the session its handles), and the registry's list would make every
        stop O(n) in the number of open files."""
        obj = cls(*args, **kwargs)
        obj._start_actor_loop()
        return obj.actor_ref

    def _start_actor_loop(self) -> None:
        self._tasks: set[Task] = set()
        inbox: _Inbox = self.actor_inbox  # type: ignore[assignment]
        with inbox._turn:
            try:
                self.on_start()
            except Exception:
                self._handle_failure(*sys.exc_info())
            inbox._actor = self
        inbox.run()

    def _handle_failure(self, *exc_info: Any) -> None:
        log.error("Unhandled exception in %s:", self, exc_info=exc_info)  # type: ignore[arg-type]
        self.actor_stopped.set()

    def _stop(self) -> Any:
        """Stop at once (pykka's stop message lands here). ``on_stop`` may return a task
        (a generator): the stop is complete when it is."""
        self.actor_stopped.set()
        try:
            return self.on_stop()
        except Exception:
            self._handle_failure(*sys.exc_info())
            return None

    # -- the mailbox, run under the actor's turn ---------------------------------------------

    def _accepting(self) -> bool:
        return not (self.exclusive and self._tasks)

    def _drain(self, messages: collections.deque[Any],
               resumes: collections.deque[tuple[Task, Future[Any]]]) -> None:
        while True:
            if resumes:
                task, future = resumes.popleft()
                self._continue(task, *future.result_or_error())
            elif messages and self._accepting():
                self._handle(messages.popleft())
            else:
                self.on_idle()
                return
            if self.actor_stopped.is_set():
                self._reject(messages)
                if not resumes:
                    self.on_idle()
                    return

    def _handle(self, envelope: Any) -> None:
        reply = envelope.reply_to
        if self.actor_stopped.is_set():
            self._reject_one(envelope)
            return
        try:
            result = self._handle_receive(envelope.message)
        except Exception:
            if reply is not None:
                reply.set_exception()
            else:
                self._handle_failure(*sys.exc_info())
                try:
                    self.on_failure(*sys.exc_info())
                except Exception:
                    self._handle_failure(*sys.exc_info())
            return
        if isinstance(result, Generator):
            task = Task(result, envelope.message, reply)
            self._tasks.add(task)
            self._continue(task, None, None)
        elif reply is not None:
            reply.set(result)

    def _continue(self, task: Task, value: Any, exc: BaseException | None) -> None:
        """Run ``task`` until it yields something pending, returns or raises."""
        task.waiting_on = None
        while True:
            try:
                awaited = task.gen.throw(exc) if exc is not None else task.gen.send(value)
            except StopIteration as stop:
                self._finish(task, stop.value, None)
                return
            except Exception as error:
                self._finish(task, None, error)
                return
            if not isinstance(awaited, Future):
                value, exc = None, TypeError(f"a task yielded {awaited!r}, not a Future")
                continue
            if awaited.done():
                value, exc = awaited.result_or_error()
                continue
            task.waiting_on = awaited
            awaited.add_done_callback(functools.partial(self._resume, task))
            return

    def _resume(self, task: Task, future: Future[Any]) -> None:
        inbox: _Inbox = self.actor_inbox  # type: ignore[assignment]
        inbox.resume(task, future)

    def _finish(self, task: Task, value: Any, exc: BaseException | None) -> None:
        self._tasks.discard(task)
        if task.reply is None:
            if exc is not None:
                # As pykka does for a told message that raises: the actor dies of it.
                info = (type(exc), exc, exc.__traceback__)
                self._handle_failure(*info)
                try:
                    self.on_failure(*info)
                except Exception:
                    self._handle_failure(*sys.exc_info())
            return
        try:
            if exc is not None:
                task.reply.set_exception((type(exc), exc, exc.__traceback__))
            else:
                task.reply.set(value)
        except queue.Full:
            pass  # already failed (the actor stopped under it)

    def on_idle(self) -> None:
        """Called under the actor's turn when its mailbox is empty, before the turn is
        let go: for work batched over several messages (the session's FORGETs)."""

    def pending_tasks(self) -> list[Task]:
        """Tasks suspended on something (for clean-up at stop: actor's turn only)."""
        return [t for t in self._tasks if t.waiting_on is not None]

    def _reject(self, messages: collections.deque[Any]) -> None:
        while messages:
            self._reject_one(messages.popleft())

    def on_rejected(self, message: Any) -> None:
        """A told message arrived after the actor stopped (an asked one fails with
        ActorDeadError): a hook for actors whose messages carry their own futures."""

    def _reject_one(self, envelope: Any) -> None:
        reply = envelope.reply_to
        if reply is None:
            self.on_rejected(envelope.message)
            return
        # (A stop asked of a stopped actor: pykka's ActorRef.stop reads this as False.)
        error = pykka.ActorDeadError(f"{self} stopped before handling the message")
        try:
            reply.set_exception((type(error), error, None))
        except queue.Full:
            pass
