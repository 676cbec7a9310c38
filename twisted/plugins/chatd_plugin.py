# No imports beyond ServiceMaker: twistd imports every dropin to list them.
from twisted.application.service import ServiceMaker

chatd = ServiceMaker(
    "chatd",
    "chatd.tap",
    "A secure, horizontally scalable real-time chat server.",
    "chatd",
)
