# -*- test-case-name: tests.test_packaging -*-
"""
The twistd plugin is found after `pip install -e` (this venv) and after a
plain install of the wheel, and the wheel ships what chatd needs and no
C{__init__.py} that would hide Twisted's own plugins (daphne #506; Twisted's
plugin howto).
"""

import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest
from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIP_TIMEOUT = 180  # the first build may fetch setuptools for build isolation
RUN_TIMEOUT = 60
# The wheel (built once, in the first test that needs it) and an install,
# each allowed PIP_TIMEOUT, and the probe: above pytest.ini's 120 s cap.
WHEEL_TEST_TIMEOUT = 2 * PIP_TIMEOUT + RUN_TIMEOUT + 30

# Runs in a bare interpreter (-S: no site, so no editable .pth) that sees
# only the installed wheel and the venv's dependencies.
PROBE = """
import json, os, sys
import twisted.plugins.chatd_plugin as dropin
cheap = "chatd" not in sys.modules and "twisted.internet.reactor" not in sys.modules
from twisted.plugin import getPlugins
from twisted.application.service import IServiceMaker
makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
import chatd
options = makers["chatd"].options
print(json.dumps({
    "taps": sorted(makers),
    "chatd": chatd.__file__,
    "dropin": dropin.__file__,
    "cheap": cheap,
    "options": options.__module__,
    "page": os.path.isfile(os.path.join(os.path.dirname(chatd.__file__), "static", "index.html")),
}))
"""


def test_plugin_found_in_this_install():
    """getPlugins(IServiceMaker) yields the chatd maker, pointing at chatd.tap."""
    makers = [p for p in getPlugins(IServiceMaker) if p.tapname == "chatd"]
    assert len(makers) == 1
    maker = makers[0]
    assert maker.module == "chatd.tap"
    from chatd import tap

    assert maker.options is tap.Options and maker.makeService is tap.makeService


def test_dropin_is_one_statement():
    """The dropin imports only ServiceMaker and makes one ServiceMaker (twistd imports every dropin)."""
    with open(os.path.join(ROOT, "twisted", "plugins", "chatd_plugin.py")) as f:
        tree = ast.parse(f.read())
    imports = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert [(n.module, [a.name for a in n.names]) for n in imports] == [
        ("twisted.application.service", ["ServiceMaker"])
    ]
    assigns = [n for n in tree.body if isinstance(n, ast.Assign)]
    assert len(assigns) == 1 and assigns[0].value.func.id == "ServiceMaker"
    assert len(tree.body) == 2


def test_no_init_in_repo_twisted_dirs():
    """twisted/ and twisted/plugins/ in the repository have no __init__.py."""
    assert not os.path.exists(os.path.join(ROOT, "twisted", "__init__.py"))
    assert not os.path.exists(os.path.join(ROOT, "twisted", "plugins", "__init__.py"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel built from a clean copy of the source (no build/ left in the work tree)."""
    source = tmp_path_factory.mktemp("source")
    for name in os.listdir(ROOT):
        path = os.path.join(ROOT, name)
        if os.path.isfile(path):
            shutil.copy2(path, source)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
    for package_dir in ("chatd", "twisted"):
        shutil.copytree(os.path.join(ROOT, package_dir), source / package_dir, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        check=True, capture_output=True, timeout=PIP_TIMEOUT, cwd=str(source),
    )
    (built,) = out.glob("chatd-*.whl")
    return built


@pytest.mark.timeout(WHEEL_TEST_TIMEOUT)
def test_wheel_contents(wheel):
    """The wheel has the dropin, the page and every package, and no twisted __init__.py."""
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    for needed in ("twisted/plugins/chatd_plugin.py", "chatd/static/index.html",
                   "chatd/__init__.py", "chatd/tap.py", "chatd/broker/__init__.py",
                   "chatd/broker/memory.py", "chatd/stomp/__init__.py", "chatd/stomp/frames.py"):
        assert needed in names, needed
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not any(n.endswith("dropin.cache") for n in names)
    assert not any(n.startswith("tests/") for n in names)
    assert {n.split("/")[0] for n in names if not n.startswith("chatd-")} == {"chatd", "twisted"}


@pytest.mark.timeout(WHEEL_TEST_TIMEOUT)
def test_plugin_found_after_plain_install(wheel, tmp_path):
    """After `pip install --target` of the wheel, a fresh interpreter lists the chatd plugin from there."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
         "--target", str(target), str(wheel)],
        check=True, capture_output=True, timeout=PIP_TIMEOUT,
    )
    assert not (target / "twisted" / "__init__.py").exists()
    paths = sysconfig.get_paths()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(target), paths["purelib"], paths["platlib"]]
    ))
    proc = subprocess.run(
        [sys.executable, "-S", "-c", PROBE], cwd=str(tmp_path), env=env,
        capture_output=True, timeout=RUN_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    found = json.loads(proc.stdout)
    assert "chatd" in found["taps"] and "web" in found["taps"]
    assert found["chatd"].startswith(str(target))
    assert found["dropin"].startswith(str(target))
    assert found["cheap"] is True
    assert found["options"] == "chatd.tap" and found["page"] is True
