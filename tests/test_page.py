"""
The browser client (chatd/static/index.html) in a real headless Chromium,
driven over the Chrome DevTools Protocol with the `websockets` client the
test kit already uses: no WebDriver, no extra dependency.

Chromium loads https://localhost:PORT/ (the fixture's allowed origin),
talks to a real twistd chatd over real TLS, and a Python L{Client} is the
other user in the room.
"""

import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from websockets.sync.client import connect

from tests.support import wait_for

CHROMIUM = os.environ.get("CHROMIUM", "chromium")
PAGE_TIMEOUT = 5.0
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--ignore-certificate-errors", "--remote-debugging-port=0", "--window-size=1000,700",
]


class CDP:
    """One DevTools connection to the browser; commands are synchronous."""

    def __init__(self, url):
        self.ws = connect(
            url, max_size=2**26, open_timeout=PAGE_TIMEOUT, ping_interval=None, legacy=True
        )
        self.ids = itertools.count(1)
        self.events = []

    def call(self, method, session=None, timeout=PAGE_TIMEOUT, **params):
        ident = next(self.ids)
        frame = {"id": ident, "method": method, "params": params}
        if session is not None:
            frame["sessionId"] = session
        self.ws.send(json.dumps(frame))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no answer to {method} in {timeout}s")
            message = json.loads(self.ws.recv(timeout=remaining))
            if message.get("id") == ident:
                if "error" in message:
                    raise AssertionError(f"{method} failed: {message['error']}")
                return message["result"]
            if "method" in message:
                self.events.append(message)

    def close(self):
        with contextlib.suppress(Exception):
            self.ws.close()


class Page:
    """One tab: JavaScript in, JSON-able values out."""

    def __init__(self, cdp, session):
        self.cdp = cdp
        self.session = session

    def call(self, method, **params):
        return self.cdp.call(method, self.session, **params)

    def js(self, expression):
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression!r} threw: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression, what, timeout=PAGE_TIMEOUT):
        """Poll a JS expression until it is truthy; bounded."""
        return wait_for(lambda: self.js(expression), timeout, what)

    def fill(self, element_id, value):
        self.js(f"document.getElementById({json.dumps(element_id)}).value = {json.dumps(value)}")

    def click(self, element_id):
        self.js(f"document.getElementById({json.dumps(element_id)}).click()")

    def text(self, element_id):
        return self.js(f"document.getElementById({json.dumps(element_id)}).textContent")

    def talk_lines(self):
        """The current room's TALK lines as [sender, text, pending]."""
        return self.js(
            "[...document.querySelectorAll('#log li.talk')].map(li => ["
            "li.querySelector('.sender').textContent, li.querySelector('.text').textContent,"
            "li.classList.contains('pending')])"
        )

    def screenshot(self, path, width, height):
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width, height=height, deviceScaleFactor=1, mobile=width < 600,
        )
        data = self.call("Page.captureScreenshot", format="png")["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))
        return path

    def problems(self):
        """Uncaught exceptions, dialogs (alert() means XSS) and CSP refusals."""
        found = []
        for event in self.cdp.events:
            if event.get("sessionId") != self.session:
                continue
            method, params = event["method"], event.get("params", {})
            if method in ("Runtime.exceptionThrown", "Page.javascriptDialogOpening"):
                found.append(event)
            elif method == "Log.entryAdded" and "Content Security Policy" in params["entry"]["text"]:
                found.append(event)
        return found


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = shutil.which(CHROMIUM) or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail(
            f"Chromium is not installed (no `{CHROMIUM}` on PATH): run `make test`, which installs it",
            pytrace=False,
        )
    profile = tmp_path_factory.mktemp("chromium-profile")
    log = open(profile.parent / "chromium.log", "wb")
    proc = subprocess.Popen(
        [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    cdp = None
    try:
        port_file = profile / "DevToolsActivePort"

        def started():
            if proc.poll() is not None:
                raise AssertionError(f"chromium exited {proc.returncode}; see {log.name}")
            lines = port_file.read_text().split("\n") if port_file.exists() else []
            return len(lines) >= 2 and lines[1] and lines

        port, path = wait_for(started, 15, "Chromium's DevToolsActivePort")[:2]
        cdp = CDP(f"ws://127.0.0.1:{port.strip()}{path.strip()}")
        yield cdp
    finally:
        if cdp is not None:
            cdp.close()
        # The launcher script execs the browser, a new session leader: its
        # group holds the renderers, GPU and zygote processes.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group
        log.close()


def open_tab(browser, url):
    """A new tab at C{url}, with the Page, Runtime and Log domains on: (target id, L{Page})."""
    target = browser.call("Target.createTarget", url="about:blank")["targetId"]
    session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    tab = Page(browser, session)
    for domain in ("Page", "Runtime", "Log"):
        tab.call(f"{domain}.enable")
    tab.call("Page.navigate", url=url)
    return target, tab


@pytest.fixture
def page(browser, chatd):
    target, tab = open_tab(browser, f"https://localhost:{chatd.port}/")
    tab.wait("document.readyState === 'complete' && !!document.getElementById('connect')", "the page")
    yield tab
    with contextlib.suppress(Exception):
        browser.call("Target.closeTarget", targetId=target)


def sign_in(page, token, name):
    page.fill("token", token)
    page.click("connect")
    page.wait(f"document.getElementById('me').textContent.includes({json.dumps(name)})", "WELCOME")


def enter(page, room):
    page.fill("room", room)
    page.click("enter")
    page.wait("document.getElementById('users').dataset.count === '1'", f"entering {room}")


def test_chat_with_python_client(chatd, page, clients, tmp_path):
    """Alice in Chromium and Bob in Python see each other enter and talk; text stays text."""
    sign_in(page, chatd.token("alice", name="Alice"), "Alice")
    enter(page, "lobby")
    assert "Alice entered" in page.text("log")

    bob = chatd.connect("bob", name="Bob")
    clients.append(bob)
    assert bob.enter("lobby")["userCount"] == 2
    page.wait("document.getElementById('log').textContent.includes('Bob entered')", "Bob's ENTER")
    page.wait("document.getElementById('users').dataset.count === '2'", "user count 2")
    assert page.text("users") == "2 users"

    bob.talk("lobby", "hello from python")
    page.wait("document.querySelectorAll('#log li.talk').length === 1", "Bob's TALK")
    assert page.talk_lines() == [["Bob", "hello from python", False]]

    page.fill("message", "hello from chromium")
    page.click("send")
    heard = bob.recv_until(lambda f: f["type"] == "TALK")[-1]
    assert (heard["sender"], heard["message"]) == ("Alice", "hello from chromium")
    assert "ref" not in heard
    # The pending line becomes the acknowledged event, same id as Bob's copy.
    page.wait("!document.querySelector('#log li.pending')", "the ack of Alice's TALK")
    assert page.js("document.querySelector('#log li.talk:last-child').dataset.id") == heard["id"]

    markup = "<img src=x onerror=alert(1)>"
    bob.talk("lobby", markup)
    page.wait("document.querySelectorAll('#log li.talk').length === 3", "the markup TALK")
    assert page.talk_lines()[-1] == ["Bob", markup, False]
    assert page.js("document.querySelectorAll('img, #log script').length") == 0

    page.click("refresh")
    page.wait(
        "document.querySelector('#rooms button')?.textContent === 'lobby2'", "the room list"
    )

    wide = page.screenshot(tmp_path / "page-wide.png", 1000, 640)
    narrow = page.screenshot(tmp_path / "page-narrow.png", 390, 760)
    print(f"screenshots: {wide} {narrow}")
    assert page.problems() == []


def test_reconnect_after_restart(chatd, page, clients, tmp_path):
    """A server restart: the page reconnects, re-enters with since, flags the gap, resends."""
    sign_in(page, chatd.token("alice", name="Alice"), "Alice")
    enter(page, "lobby")

    chatd.stop()  # close 1001; the memory broker's history is gone with it
    page.wait(
        "document.getElementById('status').textContent.includes('reconnecting')", "the retry notice"
    )
    page.fill("message", "sent while offline")
    page.click("send")
    assert page.talk_lines() == [["Alice", "sent while offline", True]]
    chatd.start()

    page.wait(
        "!document.getElementById('notice').hidden", "the missing-messages notice", timeout=10
    )
    assert "some messages may be missing" in page.text("notice").lower()
    assert "Connected as Alice" in page.text("status")
    page.wait("!document.querySelector('#log li.pending')", "the resent TALK's ack")

    bob = chatd.connect("bob", name="Bob")
    clients.append(bob)
    bob.enter("lobby")
    bob.talk("lobby", "welcome back")
    page.wait("document.querySelectorAll('#log li.talk').length === 2", "live events again")
    assert page.talk_lines() == [["Alice", "sent while offline", False], ["Bob", "welcome back", False]]
    print(f"screenshot: {page.screenshot(tmp_path / 'page-reconnected.png', 1000, 640)}")
    assert page.problems() == []


def test_errors_and_expiry_in_plain_words(chatd, page):
    """An ERROR event and close 4001 reach the status line in words; no reconnect loop."""
    sign_in(page, chatd.token("alice", ttl=3, rooms=["ops"]), "alice")
    page.fill("room", "lobby")
    page.click("enter")
    page.wait("document.getElementById('status').classList.contains('err')", "the ERROR")
    assert page.text("status") == "Error: not allowed (your token does not allow lobby)."
    assert page.js("document.querySelectorAll('#tabs button').length") == 0

    page.wait(
        "document.getElementById('status').textContent.includes('Session expired')",
        "close 4001", timeout=6,
    )
    assert page.text("status") == "Session expired — paste a fresh token and press Connect."
    assert page.text("me") == "not connected"
    assert page.problems() == []
