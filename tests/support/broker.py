"""A Celery broker that is down, for tests (tasks otherwise run eagerly, in process)."""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from celery.app.task import Task
from kombu.exceptions import OperationalError

REFUSED = "Error 111 connecting to 127.0.0.1:6379. Connection refused."


@contextmanager
def broker_down() -> Iterator[list[str]]:
    """Every task message is refused as a broker that is down refuses it; back on exit.

    Yields the names of the tasks whose messages were refused, in order.
    """
    refused: list[str] = []

    def refuse(self, *args, **kwargs):
        refused.append(self.name)
        raise OperationalError(REFUSED)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Task, "apply_async", refuse)
        yield refused
