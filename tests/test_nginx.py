# -*- test-case-name: tests.test_nginx -*-
"""
etc/nginx/chatd.conf with Debian's nginx: the shipped file is valid, and
says what docs/operations.md promises about the WebSocket location.
"""

import os
import re

from tests import support


def test_shipped_config_passes_nginx_t(tmp_path, dev_dir):
    """nginx -t accepts etc/nginx/chatd.conf (names, ports and paths filled in)."""
    nginx = support.Nginx(str(tmp_path), support.free_port(),
                          os.path.join(dev_dir[0], "fullchain.pem"), os.path.join(dev_dir[0], "privkey.pem"))
    status, output = nginx.check()
    assert status == 0, output
    assert "syntax is ok" in output


def test_websocket_location():
    """/ws passes the upgrade headers, X-Forwarded-For, no buffering, timeouts above ping interval + timeout."""
    with open(support.NGINX_SITE) as f:
        text = f.read()
    ws = text.split("location = /ws {", 1)[1].split("}", 1)[0]
    assert "proxy_set_header Upgrade $http_upgrade;" in ws
    assert "proxy_set_header Connection $chatd_connection;" in ws
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in ws
    assert "proxy_buffering off;" in ws
    timeout = int(re.search(r"proxy_read_timeout (\d+)s;", ws).group(1))
    assert timeout > 30 + 20  # [websocket] ping_interval + ping_timeout defaults
    for path in ("location = / {", "location /auth/ {", "location = /rooms {"):
        assert path in text, path
