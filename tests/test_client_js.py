"""The browser client module's unit tests (tests/js/, ``node --test``): its reconnect,
resume, presence and ticket decisions with fake sockets and timers. The same module runs
against real gateways in real Chromium in tests/browser/."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.processes import ROOT


def test_client_module_unit_tests_pass() -> None:
    node = shutil.which("node")
    if node is None:
        if os.environ.get("GATEWAY_TEST_REQUIRE_BROWSER"):
            pytest.fail("node is missing but the client module's tests are required")
        pytest.skip("node is not installed (scripts/test.sh installs it)")
    result = subprocess.run([node, "--test", "tests/js/"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout, result.stdout[-2000:]
