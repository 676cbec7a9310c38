"""Fixtures shared by every test module; the machinery is in tests/support.py."""

import pytest

from tests import support


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

    def start(name=None, wait=True, **overrides):
        server = support.Chatd(
            str(tmp_path), dev_dir[0], dev_dir[1], name=name or f"chatd{len(started)}", **overrides
        )
        started.append(server)
        return server.start(wait=wait)

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
