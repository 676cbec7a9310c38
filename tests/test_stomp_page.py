# -*- test-case-name: tests.test_stomp_page -*-
"""
A Spring-style browser client in real headless Chromium: stomp.js 2.3.3
over sockjs-client 1.6.1 (their browser builds from tests/stomp-clients),
loaded into a page of chatd's own origin, chats on /ws-stomp with chatd's
chatd.v1 page (chatd/static/index.html) in another tab.  Driven over the
DevTools protocol like tests/test_page.py, whose browser fixture it uses.
"""

import contextlib
import json
import os

from tests.support import STOMP_CLIENTS
from tests.test_page import browser, enter, open_tab, page, sign_in  # noqa: F401 (fixtures)

LIBRARIES = [
    os.path.join(STOMP_CLIENTS, "node_modules", "sockjs-client", "dist", "sockjs.min.js"),
    os.path.join(STOMP_CLIENTS, "node_modules", "stompjs", "lib", "stomp.min.js"),
]

# The Spring seed clients' code, nearly verbatim: subscribe to the room
# topic, announce ENTER, talk through /pub/chat/message.
CLIENT = """
window.got = []; window.errors = [];
const sock = new SockJS(%(url)s, null, {transports: ['websocket']});
const client = Stomp.over(sock);
client.debug = null;
window.stompClient = client;
client.connect({}, function (frame) {
  window.connectedAs = frame.headers['user-name'];
  client.subscribe('/sub/chat/room/' + %(room)s, function (message) {
    window.got.push(JSON.parse(message.body));
  });
  client.send('/pub/chat/message', {}, JSON.stringify({type: 'ENTER', roomId: %(room)s, sender: 'me', message: ''}));
}, function (error) { window.errors.push(String(error.body || error)); });
"""


@contextlib.contextmanager
def stomp_tab(browser, chatd):  # noqa: F811 (the fixture's value)
    """A tab on chatd's origin (the SockJS greeting) with stomp.js and sockjs-client loaded."""
    target, tab = open_tab(browser, f"https://localhost:{chatd.port}/ws-stomp/")
    tab.wait("document.readyState === 'complete'", "the SockJS greeting")
    for library in LIBRARIES:
        with open(library, encoding="utf-8") as f:
            tab.js(f.read() + "\n;0")
    try:
        yield tab
    finally:
        with contextlib.suppress(Exception):
            browser.call("Target.closeTarget", targetId=target)


def test_stompjs_page_chats_with_the_chatd_page(chatd, page, browser):  # noqa: F811
    """stomp.js + SockJS in one tab, chatd's page in another: presence and TALKs both ways, same ids."""
    sign_in(page, chatd.token("alice", name="Alice"), "Alice")
    enter(page, "lobby")
    with stomp_tab(browser, chatd) as tab:
        url = f"https://localhost:{chatd.port}/ws-stomp?ticket=" + chatd.ticket("bob", name="Bob")
        tab.js(CLIENT % {"url": json.dumps(url), "room": json.dumps("lobby")})
        tab.wait("window.connectedAs === 'Bob'", "CONNECTED over SockJS")
        tab.wait("window.got.length >= 1", "Bob's own ENTER")
        assert tab.js("window.got[0].type + ' ' + window.got[0].sender + ' ' + window.got[0].userCount") == "ENTER Bob 2"
        page.wait("document.getElementById('users').dataset.count === '2'", "Bob in Alice's page")

        tab.js("stompClient.send('/pub/chat/message', {}, JSON.stringify("
               "{type: 'TALK', roomId: 'lobby', sender: 'me', message: 'hello from stomp.js'}))")
        page.wait("document.querySelectorAll('#log li.talk').length === 1", "Bob's TALK in the page")
        assert page.talk_lines() == [["Bob", "hello from stomp.js", False]]

        page.fill("message", "hello from the chatd page")
        page.click("send")
        tab.wait("window.got.some(e => e.message === 'hello from the chatd page')", "Alice's TALK over STOMP")
        heard = tab.js("window.got.find(e => e.message === 'hello from the chatd page')")
        assert heard["sender"] == "Alice" and heard["type"] == "TALK" and heard["roomId"] == "lobby"
        page.wait("!document.querySelector('#log li.pending')", "the ack of Alice's TALK")
        assert page.js("document.querySelector('#log li.talk:last-child').dataset.id") == heard["id"]

        tab.js("stompClient.disconnect()")
        page.wait("document.getElementById('users').dataset.count === '1'", "Bob's QUIT")
        assert tab.js("window.errors") == []
        assert tab.problems() == [] and page.problems() == []
