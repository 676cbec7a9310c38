"""The documentation and the sample config keep up with the code."""

import configparser
import os
import re

from chatd import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as f:
        return f.read()


def test_every_key_is_documented():
    """docs/configuration.md names every section and key chatd reads."""
    text = _read("docs", "configuration.md")
    for section, keys in config.SCHEMA.items():
        assert f"## [{section}]" in text, section
        body = text.split(f"## [{section}]", 1)[1].split("\n## ", 1)[0]
        for key in keys:
            assert f"| `{key}` |" in body, f"[{section}] {key}"


def test_sample_config_lists_every_key_and_leaves_echo_off():
    """etc/chatd.ini shows every key, and /echo stays off in the sample."""
    parser = configparser.ConfigParser(inline_comment_prefixes=(";",), interpolation=None)
    parser.read_string(_read("etc", "chatd.ini"))
    for section, keys in config.SCHEMA.items():
        for key in keys:
            assert parser.has_option(section, key), f"[{section}] {key}"
    assert parser.get("conformance", "echo") == "off"


def test_every_code_is_in_the_protocol_doc():
    """docs/protocol.md lists every ERROR code and close code of chatd/errors.py."""
    from chatd import errors

    text = _read("docs", "protocol.md")
    for code in errors.ERROR_CODES:
        assert f"`{code}`" in text, code
    for name in dir(errors):
        if name.startswith("CLOSE_"):
            assert re.search(rf"\| {getattr(errors, name)} \|", text), name
