"""Sending a task never holds its caller: a broker that is down or silent delays work only."""

import threading
import time

from kombu.exceptions import OperationalError

from core import outbox


class Task:
    name = "tests.task"

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.sent = threading.Event()
        self.app = type("App", (), {"conf": type("Conf", (), {"task_always_eager": False})()})()

    def apply_async(self, args, retry=True):
        assert retry is False  # one attempt: the sweeper is the retry
        self.behaviour()
        self.sent.set()


def test_send_soon_returns_at_once_while_the_broker_is_silent():
    task = Task(lambda: time.sleep(1.0))

    started = time.perf_counter()
    outbox.send_soon(task, 1)
    elapsed = time.perf_counter() - started

    assert elapsed < 0.1
    assert task.sent.wait(5)  # sent in the background once the broker answers


def test_send_reports_a_refused_message_instead_of_raising(caplog):
    def refuse():
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    assert outbox.send(Task(refuse), 1) is False
    assert "a sweeper will send it again" in caplog.text
