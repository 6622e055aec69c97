"""bench/locustfile.py loads under locust (when locust is installed; it is not a test
requirement). Imported in a subprocess: importing locust monkey-patches the standard
library with gevent, which must not happen inside the test process."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from tests.harness import REPO

pytestmark = pytest.mark.skipif(importlib.util.find_spec("locust") is None,
                                reason="locust is not installed (pip install locust); "
                                       "it is a bench tool, not a test requirement")

CHECK = """
import runpy
ns = runpy.run_path("bench/locustfile.py")
user = ns["MQTTUser"]
names = sorted({t.__name__ for t in user.tasks})
assert names == ["publish_qos0", "publish_qos1", "reconnect_storm"], names
print("ok")
"""


def test_locustfile_imports() -> None:
    p = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and p.stdout.strip().endswith("ok"), p.stdout + p.stderr
