# -*- test-case-name: tests.test_bench -*-
"""
The reference server: a minimal room broadcast on plain Twisted + Autobahn,
the ceiling of a straightforward design on this stack.

Same TLS as chatd (chatd's own L{chatd.tls.certificate_options} on the same
certificate), the same Autobahn protocol options chatd sets, and enough of
chatd.v1 that bench/loadgen.py drives both servers alike: WELCOME on open,
ENTER / TALK / QUIT events to every member (the actor's copy carries its
C{ref}), each event encoded once and framed once with C{prepareMessage},
then C{sendPreparedMessage} per member.  No tickets, no JWT, no limits, no
history: what it leaves out is what chatd's figures pay for.

    python bench/reference.py --port P --certificate fullchain.pem --private-key privkey.pem
"""

import argparse
import itertools
import json
import sys
import time
import types


def _options(certificate, private_key):
    from chatd import tls

    settings = types.SimpleNamespace(
        path="<bench>", tls=types.SimpleNamespace(certificate=certificate, private_key=private_key)
    )
    return tls.certificate_options(settings)


def make_factory():
    """The broadcast server's WebSocket factory (rooms live on the factory)."""
    from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol

    ids = itertools.count(1)

    def encode(event):
        return json.dumps(event, separators=(",", ":"))

    class Broadcast(WebSocketServerProtocol):
        def onConnect(self, request):
            self.rooms = set()
            self.user = "bench"
            return "chatd.v1" if "chatd.v1" in request.protocols else None

        def onOpen(self):
            self.sendMessage(encode({"type": "WELCOME", "user": self.user, "expires": 0}).encode())

        def onMessage(self, payload, isBinary):
            try:
                frame = json.loads(payload)
                kind, room = frame["type"], frame["room"]
            except (ValueError, KeyError, TypeError):
                return
            members = self.factory.rooms.setdefault(room, set())
            if kind == "ENTER":
                members.add(self)
                self.rooms.add(room)
                self.broadcast(room, members, "ENTER", f"{self.user} entered", frame.get("ref"))
            elif kind == "TALK" and self in members:
                self.broadcast(room, members, "TALK", frame.get("message", ""), frame.get("ref"))
            elif kind == "QUIT" and self in members:
                self.broadcast(room, members, "QUIT", f"{self.user} left", frame.get("ref"))
                self.leave(room)

        def broadcast(self, room, members, kind, message, ref):
            event = {
                "type": kind, "id": str(next(ids)), "room": room, "sender": self.user,
                "message": message, "userCount": len(members), "ts": int(time.time() * 1000),
            }
            shared = self.factory.prepareMessage(encode(event).encode())
            for member in members:
                if member is self and ref is not None:
                    self.sendMessage(encode(dict(event, ref=ref)).encode())
                else:
                    member.sendPreparedMessage(shared)

        def leave(self, room):
            self.rooms.discard(room)
            members = self.factory.rooms.get(room)
            if members is not None:
                members.discard(self)
                if not members:
                    del self.factory.rooms[room]

        def onClose(self, wasClean, code, reason):
            for room in list(getattr(self, "rooms", ())):
                self.leave(room)

    factory = WebSocketServerFactory()
    factory.protocol = Broadcast
    factory.rooms = {}
    factory.setProtocolOptions(
        maxFramePayloadSize=65536, maxMessagePayloadSize=65536, failByDrop=False,
        openHandshakeTimeout=10, closeHandshakeTimeout=5, autoPingInterval=30, autoPingTimeout=20,
    )
    return factory


def serve(factory_maker, name, argv=None):
    """Listen with C{factory_maker()} on the command line's port and TLS files; "ready" once listening."""
    parser = argparse.ArgumentParser(description=f"bench/{name}.py")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--certificate", required=True)
    parser.add_argument("--private-key", required=True)
    args = parser.parse_args(argv)

    from twisted.internet import endpoints, reactor

    endpoint = endpoints.SSL4ServerEndpoint(
        reactor, args.port, _options(args.certificate, args.private_key), interface="127.0.0.1",
    )

    def listening(port):
        print("ready", flush=True)

    def failed(failure):
        print(f"{name}: cannot listen: {failure.value}", file=sys.stderr, flush=True)
        reactor.stop()

    endpoint.listen(factory_maker()).addCallbacks(listening, failed)
    reactor.run()


def main(argv=None):
    serve(make_factory, "reference", argv)


if __name__ == "__main__":
    main()
