# -*- test-case-name: tests.test_admin -*-
"""
The admin listener (C{[admin] endpoint}): plain HTTP for the machines that
watch chatd, apart from the public listener so it can stay on loopback or a
private network.

  - C{GET /metrics}: Prometheus text format (L{chatd.metrics});
  - C{GET /livez}: 200 whenever the reactor answers at all (a wedged
    reactor answers nothing, and the probe times out);
  - C{GET /readyz}: 200 C{{"status": "ready"}} when new clients should be
    sent here; 503 with C{"draining"} during a drain and C{"unavailable"}
    while the broker cannot serve.

Everything else is a JSON 404 or 405.  No request here is logged: probes
every few seconds would drown the access log.
"""

import json

from twisted.web import http, server
from twisted.web.resource import Resource

READY = "ready"
DRAINING = "draining"
UNAVAILABLE = "unavailable"


def _json(request, status, body):
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(body).encode("utf-8")


class _Leaf(Resource):
    isLeaf = True

    def render(self, request):
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return _json(request, http.NOT_ALLOWED, {"error": "method_not_allowed", "message": "use GET"})
        if request.postpath not in ([], [b""]):
            return _json(request, http.NOT_FOUND, {"error": "not_found", "message": "no such resource"})
        return self.render_GET(request)


class MetricsResource(_Leaf):
    """GET /metrics."""

    def __init__(self, metrics):
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request):
        body, content_type = self._metrics.render()
        request.setHeader(b"content-type", content_type.encode("ascii"))
        request.setHeader(b"cache-control", b"no-store")
        return body


class LiveResource(_Leaf):
    """GET /livez: the reactor runs."""

    def render_GET(self, request):
        return _json(request, http.OK, {"status": "alive"})


class ReadyResource(_Leaf):
    """GET /readyz: whether a load balancer should send new clients here."""

    def __init__(self, readiness):
        """
        @param readiness: returns L{READY}, L{DRAINING} or L{UNAVAILABLE}.
        """
        super().__init__()
        self._readiness = readiness

    def render_GET(self, request):
        state = self._readiness()
        status = http.OK if state == READY else http.SERVICE_UNAVAILABLE
        return _json(request, status, {"status": state})


class _Root(Resource):
    def getChild(self, path, request):
        return _NotFound()

    def render(self, request):
        return _NotFound().render(request)


class _NotFound(Resource):
    isLeaf = True

    def render(self, request):
        return _json(request, http.NOT_FOUND, {"error": "not_found", "message": "no such resource"})


class AdminSite(server.Site):
    """A Site that logs no requests (see the module docstring)."""

    displayTracebacks = False

    def log(self, request):
        pass


def make_admin_site(metrics, readiness, api_resource=None):
    """
    @param metrics: a L{chatd.metrics.Metrics}.
    @param readiness: see L{ReadyResource}.
    @param api_resource: the server API (L{chatd.api.ApiResource}) to serve
        at C{/api} here too, or L{None}; it checks its keys itself.
    """
    root = _Root()
    root.putChild(b"metrics", MetricsResource(metrics))
    root.putChild(b"livez", LiveResource())
    root.putChild(b"readyz", ReadyResource(readiness))
    if api_resource is not None:
        root.putChild(b"api", api_resource)
    return AdminSite(root)
