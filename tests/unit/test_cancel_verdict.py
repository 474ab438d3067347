"""What a step's cancelled statement means (executor.cancel_verdict): every cause of a
QueryCanceled (SQLSTATE 57014) the executor can meet, and the clock disagreements that must
not turn a time-out into a bare cancel."""

from __future__ import annotations

import math

import pytest

from durable_actor.executor import OUR_CANCEL_LANDS, TIMEOUT_SLACK, cancel_verdict

LONG_AGO = math.inf


@pytest.mark.parametrize(("asked", "cut", "timeout", "elapsed", "since", "verdict"), [
    # df.cancel asked for this step: it fails with the server's message, time-out or not
    (True, False, None, 0.1, 0.0, "cancelled"),
    (True, True, 0.5, 0.6, 0.0, "cancelled"),
    # its batch was cut short to commit: it runs again on its own, even past its time-out
    (False, True, None, 0.06, 0.0, "rerun"),
    (False, True, 0.5, 0.6, 0.0, "rerun"),
    # ran for its time-out: timed out, whatever else was sent lately
    (False, False, 0.5, 0.5, LONG_AGO, "timeout"),
    (False, False, 0.5, 0.5 - TIMEOUT_SLACK, 0.1, "timeout"),
    # cancelled sooner by the server's timer, nothing of ours in flight: still its time-out
    (False, False, 0.5, 0.3, LONG_AGO, "timeout"),
    (False, False, 0.5, 0.3, OUR_CANCEL_LANDS, "timeout"),
    # cancelled sooner while a cancel of ours may still land: meant for another step
    (False, False, 0.5, 0.3, OUR_CANCEL_LANDS - 0.1, "rerun"),
    (False, False, None, 2.0, 1.0, "rerun"),
    # no time-out, no cancel of ours: someone else cancelled it, and the step says so
    (False, False, None, 2.0, LONG_AGO, "cancelled"),
])
def test_each_cause_of_a_cancelled_statement(asked: bool, cut: bool, timeout: float | None,
                                             elapsed: float, since: float,
                                             verdict: str) -> None:
    assert cancel_verdict(asked=asked, cut=cut, timeout=timeout, elapsed=elapsed,
                          since_our_cancel=since) == verdict
