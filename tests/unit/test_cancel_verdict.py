"""What a step's cancelled statement means (executor.cancel_verdict): every cause of a
QueryCanceled (SQLSTATE 57014) the executor can meet, and the clock disagreement that must
not turn a time-out into a bare cancel."""

from __future__ import annotations

import math

import psycopg
import pytest

from durable_actor.executor import OUR_CANCEL_LANDS, TIMEOUT_SLACK, cancel_verdict, says_timeout

LONG_AGO = math.inf


@pytest.mark.parametrize(("asked", "cut", "timeout", "elapsed", "since", "says", "verdict"), [
    # df.cancel asked for this step: it fails with the server's message, time-out or not
    (True, False, None, 0.1, 0.0, False, "cancelled"),
    (True, True, 0.5, 0.6, 0.0, True, "cancelled"),
    # its batch was cut short to commit: it runs again on its own, even past its time-out
    (False, True, None, 0.06, LONG_AGO, False, "rerun"),
    (False, True, 0.5, 0.6, LONG_AGO, True, "rerun"),
    # ran for its time-out: timed out, whatever else was sent lately
    (False, False, 0.5, 0.5, LONG_AGO, False, "timeout"),
    (False, False, 0.5, 0.5 - TIMEOUT_SLACK, 0.1, False, "timeout"),
    # the server says its timer fired before ours counted the time-out (the CI case)
    (False, False, 0.5, 0.3, LONG_AGO, True, "timeout"),
    (False, False, 0.5, 0.3, 0.1, True, "timeout"),
    # cancelled sooner, not by the timer: someone else's cancel, and the step says so
    (False, False, 0.5, 0.3, LONG_AGO, False, "cancelled"),
    (False, False, 0.5, 0.3, OUR_CANCEL_LANDS, False, "cancelled"),
    # ... or a df.cancel of ours meant for another step: it runs again
    (False, False, 0.5, 0.3, OUR_CANCEL_LANDS - 0.1, False, "rerun"),
    (False, False, None, 2.0, 1.0, False, "rerun"),
    # no time-out, no cancel of ours: someone else cancelled it
    (False, False, None, 2.0, LONG_AGO, False, "cancelled"),
    (False, False, None, 2.0, LONG_AGO, True, "cancelled"),
])
def test_each_cause_of_a_cancelled_statement(asked: bool, cut: bool, timeout: float | None,
                                             elapsed: float, since: float, says: bool,
                                             verdict: str) -> None:
    assert cancel_verdict(asked=asked, cut=cut, timeout=timeout, elapsed=elapsed,
                          since_our_cancel=since, says_timeout=says) == verdict


def test_the_servers_reason_is_read_from_its_message() -> None:
    timer = psycopg.errors.QueryCanceled("canceling statement due to statement timeout")
    user = psycopg.errors.QueryCanceled("canceling statement due to user request")
    assert says_timeout(timer) and not says_timeout(user)
