"""Stopping on SIGINT/SIGTERM: what the user is told."""

from __future__ import annotations

import signal

import pytest

from contrastive_cli.signals import GracefulStop, Interrupted


@pytest.mark.parametrize("saved", [False, True])
def test_an_immediate_stop_says_whether_a_checkpoint_exists(tmp_path, saved):
    checkpoint = tmp_path / "checkpoints" / "last.pt"
    if saved:
        checkpoint.parent.mkdir()
        checkpoint.write_bytes(b"x")
    with GracefulStop(checkpoint) as stop, pytest.raises(Interrupted) as raised:
        stop._handle(signal.SIGTERM, None)  # outside the loop: stops at once
    assert raised.value.exit_code == 143
    message = str(raised.value)
    if saved:
        assert "the last checkpoint is intact" in message
    else:
        assert "no checkpoint had been written yet" in message and "intact" not in message


def test_the_first_signal_in_the_loop_asks_for_a_checkpoint_the_second_stops(tmp_path):
    with GracefulStop(tmp_path / "last.pt") as stop:
        stop.graceful = True
        stop._handle(signal.SIGINT, None)
        assert stop.requested and stop.signum == signal.SIGINT
        with pytest.raises(Interrupted):
            stop._handle(signal.SIGINT, None)
