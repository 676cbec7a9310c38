"""chatd: a secure, horizontally scalable real-time chat server on Twisted."""

__version__ = "0.1.0"
