"""The actor runtime without a device: inline actors, their futures and tasks."""

from __future__ import annotations

import threading
from collections.abc import Generator
from typing import Any

import pykka
import pytest

from pyvirtiofs.actors.runtime import Future, InlineActor, done, mark_nonblocking


class Recorder(InlineActor):
    """Appends what it is told; ``("wait", future)`` suspends a task on ``future``."""

    last: Recorder | None = None  # the instance started last (the test's own record)

    def __init__(self) -> None:
        super().__init__()
        Recorder.last = self
        self.seen: list[Any] = []
        self.threads: set[str] = set()
        self.failed: list[BaseException | None] = []
        self.stopped = False

    def on_receive(self, message: Any) -> Any:
        self.threads.add(threading.current_thread().name)
        if isinstance(message, tuple) and message[0] == "wait":
            return self._wait(message[1])
        if message == "boom":
            raise ValueError("boom")
        self.seen.append(message)
        return len(self.seen)

    def _wait(self, future: Future[Any]) -> Generator[Future[Any], Any, Any]:
        value = yield future
        self.threads.add(threading.current_thread().name)
        self.seen.append(("woken", value))
        return value

    def on_failure(self, *exc_info: Any) -> None:
        self.failed.append(exc_info[1])

    def on_stop(self) -> None:
        self.stopped = True


class Exclusive(Recorder):
    exclusive = True


def test_inline_actor_runs_in_the_callers_thread_and_starts_none() -> None:
    before = threading.active_count()
    ref = Recorder.start()
    assert ref.ask("a") == 1 and ref.ask("b") == 2
    assert threading.active_count() == before
    actor = Recorder.last
    assert actor is not None
    assert actor.threads == {threading.current_thread().name}
    ref.stop()
    assert actor.stopped and not ref.is_alive()
    with pytest.raises(pykka.ActorDeadError):
        ref.ask("c")


def test_messages_from_many_threads_are_handled_one_at_a_time_in_order() -> None:
    ref = Recorder.start()
    actor = Recorder.last
    assert actor is not None
    per_thread = 2000

    def send(tag: int) -> None:
        for i in range(per_thread):
            ref.tell((tag, i))

    threads = [threading.Thread(target=send, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(actor.seen) == 4 * per_thread
    for tag in range(4):  # each sender's messages in the order it sent them
        assert [i for t, i in actor.seen if t == tag] == list(range(per_thread))


def test_a_task_suspends_without_blocking_and_resumes_on_the_completing_thread() -> None:
    ref = Recorder.start()
    actor = Recorder.last
    assert actor is not None
    pending: Future[str] = Future()
    reply = ref.ask(("wait", pending), block=False)
    assert not reply.done()
    assert ref.ask("other") == 1  # the actor is free meanwhile
    completer = threading.Thread(target=pending.set, args=("value",), name="completer")
    completer.start()
    completer.join()
    assert reply.get(timeout=5) == "value"
    assert actor.seen == ["other", ("woken", "value")]
    assert "completer" in actor.threads


def test_an_exclusive_actor_holds_messages_until_its_task_ends() -> None:
    ref = Exclusive.start()
    actor = Recorder.last
    assert actor is not None
    pending: Future[int] = Future()
    first = ref.ask(("wait", pending), block=False)
    second = ref.ask("after", block=False)
    assert not second.done()  # waits behind the task
    pending.set(7)
    assert first.get(timeout=5) == 7 and second.get(timeout=5) == 2
    assert actor.seen == [("woken", 7), "after"]


def test_a_told_message_that_fails_kills_the_actor_as_pykka_does() -> None:
    ref = Recorder.start()
    actor = Recorder.last
    assert actor is not None
    with pytest.raises(ValueError, match="boom"):
        ref.ask("boom")  # asked: the caller gets it, the actor lives
    assert ref.is_alive()
    ref.tell("boom")
    assert not ref.is_alive() and isinstance(actor.failed[0], ValueError)


def test_a_task_failing_after_a_told_message_kills_the_actor_too() -> None:
    ref = Recorder.start()
    actor = Recorder.last
    assert actor is not None
    pending: Future[int] = Future()
    ref.tell(("wait", pending))
    pending.fail(OSError(5, "device says no"))
    assert not ref.is_alive() and isinstance(actor.failed[0], OSError)


def test_future_callbacks_and_completion_rules() -> None:
    f: Future[int] = Future()
    calls: list[tuple[Any, BaseException | None]] = []
    f.add_done_callback(lambda fut: calls.append(fut.result_or_error()))
    f.set(3)
    f.add_done_callback(lambda fut: calls.append(fut.result_or_error()))  # runs at once
    assert calls == [(3, None), (3, None)] and f.get(timeout=0) == 3
    f.fail(OSError(1, "late"))  # ignored: the first outcome stands
    assert f.get(timeout=0) == 3
    g: Future[int] = Future()
    with pytest.raises(pykka.Timeout):
        g.get(timeout=0.01)
    assert done(5).get() == 5


def test_a_nonblocking_thread_may_not_wait() -> None:
    errors: list[BaseException] = []

    def device_thread() -> None:
        mark_nonblocking()
        try:
            Future().get(timeout=10)
        except RuntimeError as exc:
            errors.append(exc)
        assert done(1).get() == 1  # a completed future needs no wait: allowed

    t = threading.Thread(target=device_thread)
    t.start()
    t.join(timeout=5)
    assert len(errors) == 1 and "never wait" in str(errors[0])
