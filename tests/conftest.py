"""Fixtures shared by every test module; the machinery is in tests/support.py."""

import pytest
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from tests import support


class LoggedFailures:
    """What was logged at error level or with a failure; C{expect} excuses a message."""

    def __init__(self):
        self.events = []
        self._expected = []

    def expect(self, text):
        """Excuse logged errors whose text (traceback included) contains C{text}."""
        self._expected.append(text)

    def __call__(self, event):
        if event.get("log_failure") is not None or event.get("log_level") in (
            LogLevel.error, LogLevel.critical
        ):
            self.events.append(event)

    def unexpected(self):
        """The logged errors no C{expect} excused, as text."""
        texts = [
            formatEvent(e) + (e["log_failure"].getTraceback() if e.get("log_failure") else "")
            for e in self.events
        ]
        return [t for t in texts if not any(x in t for x in self._expected)]


@pytest.fixture(autouse=True)
def logged_failures():
    """
    Like trial (and magic-wormhole's C{observe_errors}): every test fails
    when anything in this process logged a failure or an error (an
    unhandled exception in a Deferred, a log.failure, log.error) that it did
    not C{expect}.  Warnings are how expected trouble (a Redis outage) shows.
    Processes a test starts log to their own files; tests read those.
    """
    observer = LoggedFailures()
    globalLogPublisher.addObserver(observer)
    try:
        yield observer
    finally:
        globalLogPublisher.removeObserver(observer)
    unexpected = observer.unexpected()
    assert not unexpected, "logged during the test:\n" + "\n".join(unexpected)


@pytest.fixture(scope="session")
def dev_dir(tmp_path_factory):
    """One certificate/key/secret set for the whole run."""
    directory = str(tmp_path_factory.mktemp("dev"))
    secret = support.make_dev_files(directory)
    return directory, secret


@pytest.fixture
def start_chatd(tmp_path, dev_dir):
    """
    C{start_chatd(**overrides)} starts a real twistd chatd (overrides are
    C{section__key=value}); every one is stopped by PID at teardown.
    """
    started = []

    def start(name=None, wait=True, env=None, wrapper=(), **overrides):
        server = support.Chatd(
            str(tmp_path), dev_dir[0], dev_dir[1], name=name or f"chatd{len(started)}", **overrides
        )
        started.append(server)
        return server.start(wait=wait, env=env, wrapper=wrapper)

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def chatd(start_chatd):
    """One chatd on the embedded broker."""
    return start_chatd()


@pytest.fixture
def start_redis(tmp_path):
    started = []

    def start(port=None):
        server = support.Redis(str(tmp_path), port)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def clients():
    """A list to put Clients in; all are closed at teardown."""
    opened = []
    yield opened
    for client in opened:
        client.close()
