"""The daemon's sync schedule (SPEC §8, §9) as a unit: a debounced push after local
writes, a fetch every sync.interval, remote checks every sync.wait_interval while an
agent waits (backing off while nothing changes), retries after failures. The clock is
injected, so minutes of daemon life take microseconds; the daemon tests check that the
daemon follows the schedule."""

import sys

import pytest

from conftest import REPO_ROOT

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
import thrum  # noqa: E402


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock():
    return Clock()


def schedule(clock, interval=60.0, wait_every=5.0):
    return thrum.SyncSchedule(interval, wait_every, clock=clock)


def run_until(sched, clock, until, waiting=False, moved=lambda: False, step=None):
    """Drive the schedule like the daemon's loop: look (the loop has just been woken,
    as `wrote()` and `poke()` wake it), take the action and report it, sleep `due_in`.
    Returns [(time since start, action)]."""
    start, actions = clock.now, []
    while clock.now - start <= until:
        action = sched.next_action(waiting)
        if action is None:
            due = sched.due_in(waiting)
            clock.advance(due if step is None else min(due, step))
            continue
        actions.append((round(clock.now - start, 3), action))
        if action == "check":
            m = moved()
            sched.checked(m)
            if m:
                sched.started()
                sched.ran(pulled=True)
        elif action in ("push", "fetch", "commit"):
            sched.started()
            sched.ran(pulled=False)
    return actions


def test_an_idle_daemon_only_fetches_once_per_interval(clock):
    sched = schedule(clock)
    acts = run_until(sched, clock, 3600)
    assert acts == [(60.0 * i, "fetch") for i in range(1, 61)]


def test_a_burst_of_writes_is_pushed_once_two_seconds_after_its_first_write(clock):
    sched = schedule(clock)
    sched.wrote()
    clock.advance(1.5)
    sched.wrote()  # a later write of the burst does not delay the push
    assert sched.next_action(False) is None
    assert sched.due_in(False) == pytest.approx(0.5)
    clock.advance(0.5)
    assert sched.next_action(False) == "push"
    assert sched.pending()  # until a cycle starts (the loop decides: is there a remote?)
    sched.started()
    sched.ran(pulled=False)
    assert not sched.pending()
    assert sched.due_in(False) == pytest.approx(60.0)


def test_without_a_remote_writes_are_committed_at_the_next_interval(clock):
    sched = schedule(clock)
    sched.wrote()
    clock.advance(2.0)
    assert sched.next_action(False) == "push"
    # the loop finds no remote: nothing runs, the writes stay pending for the interval
    assert sched.pending()
    clock.advance(sched.due_in(False))
    assert clock.now == pytest.approx(1060.0)
    assert sched.next_action(False) == "commit"
    sched.started()
    sched.ran(pulled=False)
    assert not sched.pending()
    clock.advance(sched.due_in(False))
    assert sched.next_action(False) == "fetch"


def test_while_an_agent_waits_the_remote_is_checked_often_then_less(clock):
    sched = schedule(clock)
    sched.poke()  # a new wait
    acts = run_until(sched, clock, 600, waiting=True)
    checks = [t for t, a in acts if a == "check"]
    gaps = [round(b - a, 3) for a, b in zip([0.0] + checks, checks)]
    # six checks at the short interval, then the gap doubles up to sync.interval
    assert gaps[:6] == [5.0] * 6
    assert gaps[6:9] == [10.0, 20.0, 40.0]
    assert max(gaps) == 60.0
    assert all(g <= 60.0 for g in gaps)


def test_a_change_brings_the_short_interval_back(clock):
    sched = schedule(clock)
    run_until(sched, clock, 300, waiting=True)  # backed off by now
    assert sched.check_every == 60.0
    sched.wrote()  # a local write: a conversation is on
    acts = run_until(sched, clock, 20, waiting=True)
    # the write goes out within the debounce (with a fetch that was due anyway, or a push)
    assert any(a in ("push", "fetch") and t <= 2.0 for t, a in acts), acts
    checks = [t for t, a in acts if a == "check"]
    assert checks[:3] == [5.0, 10.0, 15.0]


def test_a_moved_remote_resets_the_backoff_and_runs_a_cycle(clock):
    sched = schedule(clock)
    moves = iter([False] * 8 + [True] + [False] * 100)
    acts = run_until(sched, clock, 200, waiting=True, moved=lambda: next(moves))
    checks = [t for t, a in acts if a == "check"]
    gaps = [round(b - a, 3) for a, b in zip([0.0] + checks, checks)]
    # 6 quiet at 5 s, then 10, 20; the 9th check sees a move: 5 s again
    assert gaps[:9] == [5.0] * 6 + [10.0, 20.0, 40.0]
    assert gaps[9:12] == [5.0, 5.0, 5.0]


def test_a_new_wait_resets_the_backoff(clock):
    sched = schedule(clock)
    run_until(sched, clock, 400, waiting=True)
    sched.poke()
    acts = run_until(sched, clock, 11, waiting=True)
    assert [t for t, a in acts if a == "check"][:2] == [5.0, 10.0]


def test_nobody_waiting_means_no_remote_checks(clock):
    sched = schedule(clock)
    acts = run_until(sched, clock, 300, waiting=False)
    assert all(a == "fetch" for _, a in acts)


def test_failures_back_off_up_to_the_interval_then_recover(clock):
    sched = schedule(clock, interval=300.0)
    clock.advance(sched.due_in(False))
    assert sched.next_action(False) == "fetch"
    gaps = []
    for _ in range(8):
        sched.started()
        sched.failed()
        due = sched.due_in(False)
        gaps.append(due)
        clock.advance(due)
        assert sched.next_action(False) == "fetch"
    assert gaps == [10.0, 20.0, 40.0, 80.0, 160.0, 300.0, 300.0, 300.0]
    sched.started()
    sched.ran(pulled=False)
    assert sched.failures == 0 and sched.due_in(False) == 300.0


def test_a_shorter_configured_interval_applies_at_once(clock):
    sched = schedule(clock)
    run_until(sched, clock, 400, waiting=True)
    assert sched.check_every == 60.0
    sched.set_intervals(20.0, 5.0)
    assert sched.check_every == 20.0
    acts = run_until(sched, clock, 100, waiting=False)
    fetches = [t for t, a in acts if a == "fetch"]
    assert all(round(b - a, 3) == 20.0 for a, b in zip(fetches, fetches[1:]))


# --------------------------------------------------------------------------- work contexts

def test_a_change_that_reverts_within_the_settle_window_is_no_event(clock):
    pub = thrum.ContextPublishing(clock=clock)
    published = ("main", [])
    swap = ("main", [{"path": ".x.swp", "status": "untracked"}])
    decisions = []
    for t, seen in ((0, published), (5, swap), (10, published), (15, published)):
        clock.now = 1000.0 + t
        decisions.append(pub.decide("bob", seen, published))
    assert decisions == [None, "changed", "revert", None]


def test_a_settled_change_is_published_at_most_once_a_minute(clock):
    pub = thrum.ContextPublishing(clock=clock)
    published = ("main", [])
    published_at = []
    for step in range(0, 240, 5):  # the daemon looks every 5 s; the files keep changing
        clock.now = 1000.0 + step
        observed = ("main", [{"path": "f%d.py" % (step // 20), "status": "modified"}])
        if pub.decide("bob", observed, published) == "publish":
            published_at.append(step)
            published = observed
    assert published_at, "a change that holds is published"
    assert all(b - a >= 60 for a, b in zip(published_at, published_at[1:])), published_at
    # one that holds still gets out: 10 s after it settled, once the minute is over
    clock.now += 60
    steady = ("feature", [])
    assert pub.decide("bob", steady, published) == "changed"
    clock.now += 10
    assert pub.decide("bob", steady, published) == "publish"


def test_agents_are_paced_separately(clock):
    pub = thrum.ContextPublishing(clock=clock)
    change = ("main", [{"path": "a.py", "status": "modified"}])
    for aid in ("bob", "carol"):
        assert pub.decide(aid, change, ("main", [])) == "changed"
    clock.advance(10)
    assert [pub.decide(a, change, ("main", [])) for a in ("bob", "carol")] == \
        ["publish", "publish"]
