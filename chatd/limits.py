# -*- test-case-name: tests.test_limits -*-
"""
Per-connection rate limiting: a token bucket over an injected clock.
"""


class TokenBucket:
    """
    C{rate} tokens a second, at most C{burst} saved up.  Starts full, so a
    client may send C{burst} messages at once after being quiet.
    """

    def __init__(self, rate, burst, clock):
        self._rate = float(rate)
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._last = clock.seconds()

    def take(self):
        """Spend one token; False when there is none (the caller refuses)."""
        now = self._clock.seconds()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
