"""`make demo` end to end (small load): the pair survives kill -9 of either node."""

import pytest

from sidecar.demo import main

pytestmark = pytest.mark.slow


def test_demo_runs_clean(capsys):
    assert main(contacts=3000) == 0
    out = capsys.readouterr().out
    assert "OK - no contact lost" in out and "restart node A with empty memory" in out


def test_lab_demo_runs_clean(capsys):
    from sidecar.demo_lab import lab_unavailable
    from sidecar.demo_lab import main as lab_main

    why = lab_unavailable()
    if why is not None:
        pytest.skip(f"network-namespace lab unavailable: {why}")
    assert lab_main(phones=50) == 0
    out = capsys.readouterr().out
    assert "B takes over" in out and "0 from A" in out
