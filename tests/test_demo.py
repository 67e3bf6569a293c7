"""`make demo` end to end (small load): the pair survives kill -9 of either node."""

import pytest

from sidecar.demo import main

pytestmark = pytest.mark.slow


def test_demo_runs_clean(capsys):
    assert main(contacts=3000) == 0
    out = capsys.readouterr().out
    assert "OK - no contact lost" in out and "restart node A with empty memory" in out
