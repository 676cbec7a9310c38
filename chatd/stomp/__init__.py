"""
STOMP 1.0-1.2 over WebSocket (and SockJS's WebSocket transport), so
Spring-style chat clients talk to chatd unchanged.

Pure parts, no I/O: L{chatd.stomp.frames} (the frame codec),
L{chatd.stomp.mapping} (destinations and bodies to and from chatd's room
commands and events) and L{chatd.stomp.sockjs} (SockJS framing).
docs/stomp.md is the contract.
"""
