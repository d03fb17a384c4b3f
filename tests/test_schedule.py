"""The daemon's sync schedule (SPEC §8, §9) as a unit: a debounced, jittered push after
local writes, a fetch every sync.interval, remote checks every sync.wait_interval while
an agent of the clone is active (waits, watches, or ran a command in the last 10
minutes), at most one remote request a minute once idle, backoff when checks or cycles
fail. The clock is injected, so an hour of daemon life takes milliseconds; the daemon
tests check that the daemon follows the schedule."""

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


def schedule(clock, interval=60.0, wait_every=5.0, jitter=0.5):
    """A schedule of a clone alone, whose push jitter is fixed (`jitter` of PUSH_JITTER)."""
    return thrum.SyncSchedule(interval, wait_every, clock=clock, rand=lambda: jitter)


def run_until(sched, clock, until, waiting=False, moved=lambda: False, step=None,
              fails=lambda: False):
    """Drive the schedule like the daemon's loop: look (the loop has just been woken,
    as `wrote()` and `command()` wake it), take the action and report it, sleep `due_in`.
    `moved()` answers a remote check, `fails()` says whether a check or cycle failed.
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
            if fails():
                sched.check_failed()
                continue
            m = moved()
            sched.checked(m)
            if m:
                sched.started()
                sched.ran(pulled=True)
        elif action in ("push", "fetch", "commit"):
            sched.started()
            sched.failed() if fails() else sched.ran(pulled=False)
    return actions


def checks_of(acts):
    return [t for t, a in acts if a == "check"]


def looks_of(acts):
    """When the remote was looked at: checks, and cycles (which fetch)."""
    return [t for t, a in acts if a in ("check", "fetch", "push")]


def gaps_of(times, start=0.0):
    return [round(b - a, 3) for a, b in zip([start] + times, times)]


def remote_requests_per_minute(acts, start, end):
    """{minute: remote requests} (a check is one ls-remote, a fetch or push cycle one
    fetch) in [start, end)."""
    out = {m: 0 for m in range(int(start // 60), int(end // 60))}
    for t, a in acts:
        if start <= t < end and a in ("check", "fetch", "push"):
            out[int(t // 60)] += 1
    return out


def test_an_idle_daemon_only_fetches_once_per_interval(clock):
    sched = schedule(clock)
    acts = run_until(sched, clock, 3600)
    assert acts == [(60.0 * i, "fetch") for i in range(1, 61)]


def test_a_burst_of_writes_is_pushed_once_about_two_seconds_after_its_first_write(clock):
    sched = schedule(clock)  # alone: PUSH_AFTER + half of PUSH_JITTER here, 1.5 s
    after = thrum.SyncSchedule.PUSH_AFTER + 0.5 * thrum.SyncSchedule.PUSH_JITTER
    assert 1.0 <= after <= 2.5
    sched.wrote()
    clock.advance(after - 0.5)
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


def test_pushes_of_clones_that_wrote_at_once_are_spread_out(clock):
    """The debounce has a random part, so clones that wrote at the same moment do not
    all push at the same moment (SPEC §8, "Many clones"); on average it is 2 s."""
    due = []
    for r in (0.0, 0.25, 0.5, 0.75, 0.999):
        sched = schedule(clock, jitter=r)
        sched.wrote()
        due.append(sched.due_in(False))
    assert due == sorted(due) and len(set(due)) == len(due), due
    lo, hi = thrum.SyncSchedule.PUSH_AFTER, thrum.SyncSchedule.PUSH_AFTER + \
        thrum.SyncSchedule.PUSH_JITTER
    assert all(lo <= d < hi for d in due), due
    assert 1.0 <= lo and hi <= 2.5  # "about 2 s" (SPEC §9)


def test_clones_that_wrote_at_once_push_in_their_own_slots(clock):
    """SPEC §8 "Many clones": 10 clones that wrote at the same moment push one after
    another, each in its own slot of a wall-clock frame (every clone computes the same
    frame), so no two pushes of the burst overlap: no rejection by design."""
    n, wall = 10, [1_700_000_000.123]
    pushes = []
    for rank in range(n):
        sched = thrum.SyncSchedule(60.0, 5.0, clock=clock, rand=lambda: 0.0,
                                   wall=lambda: wall[0])
        sched.set_slot(rank, n)
        sched.wrote()
        pushes.append(wall[0] + sched.due_in(False))
    slot = thrum.SyncSchedule.PUSH_SLOT
    assert all(thrum.SyncSchedule.PUSH_AFTER <= p - wall[0] <
               thrum.SyncSchedule.PUSH_AFTER + n * slot for p in pushes), pushes
    gaps = sorted(round(b - a, 6) for a, b in zip(sorted(pushes), sorted(pushes)[1:]))
    assert gaps[0] >= slot - 1e-6, gaps  # one slot apart at least
    # the same clone, writing later, still pushes at the start of its slot of the frame
    sched = thrum.SyncSchedule(60.0, 5.0, clock=clock, wall=lambda: wall[0] + 7.77)
    sched.set_slot(3, n)
    sched.wrote()
    at = wall[0] + 7.77 + sched.due_in(False)
    assert round(at / slot) * slot == pytest.approx(at) and round(at / slot) % n == 3


def test_many_clones_share_a_frame_of_at_most_five_seconds(clock):
    n, wall = 40, 1_700_000_000.0
    due = []
    for rank in range(n):
        sched = thrum.SyncSchedule(60.0, 5.0, clock=clock, wall=lambda: wall)
        sched.set_slot(rank, n)
        sched.wrote()
        due.append(sched.due_in(False))
    assert max(due) - min(due) < thrum.SyncSchedule.PUSH_FRAME
    assert len({round(d, 6) for d in due}) == n  # still one slot each


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


def test_while_an_agent_waits_the_remote_is_checked_every_wait_interval(clock):
    """SPEC §9: while an agent of this clone waits, the remote check keeps the short
    interval, however long nothing changes (a message to it arrives within
    sync.wait_interval plus the sender's push delay)."""
    sched = schedule(clock)
    sched.poke()  # a new wait
    acts = run_until(sched, clock, 3600, waiting=True)
    gaps = gaps_of(looks_of(acts))
    assert len(gaps) >= 720 and max(gaps) == 5.0, sorted(set(gaps))
    assert len(checks_of(acts)) >= 660  # the interval fetches count as looks


def test_a_command_keeps_the_short_interval_for_ten_minutes(clock):
    """SPEC §9: an agent that ran a command in the last 10 minutes counts as active
    (no wait needed); then the clone is idle again: no checks, one fetch a minute."""
    sched = schedule(clock)
    clock.advance(30)
    sched.command()  # e.g. `thrum inbox` served by the daemon
    acts = run_until(sched, clock, 1200)
    checks = checks_of(acts)
    assert checks[0] == 5.0 and max(gaps_of([t for t in looks_of(acts) if t < 600])) == 5.0
    assert 595.0 <= checks[-1] < 600.0, checks[-5:]
    assert all(a == "fetch" for t, a in acts if t >= 600.0)


def test_every_command_extends_the_active_window(clock):
    sched = schedule(clock)
    sched.command()
    acts = run_until(sched, clock, 400)
    sched.command()  # 400 s later: active until 1000 s
    acts += [(t + 400.1, a) for t, a in run_until(sched, clock, 900)]
    checks = checks_of(acts)
    gaps = gaps_of([t for t in looks_of(acts) if t < 1000])
    assert max(gaps) <= 5.2, max(gaps)
    assert 990.0 <= checks[-1] < 1001.0, checks[-3:]


def test_an_idle_clone_asks_the_remote_at_most_once_a_minute(clock):
    """An hour of a clone whose agents were busy for the first minutes, then stopped:
    once no agent is active, at most one remote request per minute (SPEC §9)."""
    sched = schedule(clock)
    sched.command()
    acts = run_until(sched, clock, 120, waiting=True)  # a wait, commands
    sched.command()
    acts += [(t + 120.0, a) for t, a in run_until(sched, clock, 3600)]
    busy = remote_requests_per_minute(acts, 0, 120)
    assert all(n >= 11 for n in busy.values()), busy
    idle = remote_requests_per_minute(acts, 720, 3600)  # 10 minutes after the last command
    assert idle and all(n <= 1 for n in idle.values()), idle
    assert sum(idle.values()) >= len(idle) - 1  # ...and still fetches every interval


def test_a_moved_remote_runs_a_cycle_and_the_checks_go_on(clock):
    sched = schedule(clock)
    sched.poke()
    moves = iter([False] * 8 + [True] + [False] * 100)
    acts = run_until(sched, clock, 120, waiting=True, moved=lambda: next(moves))
    assert max(gaps_of(looks_of(acts))) == 5.0
    assert len(checks_of(acts)) >= 20


def test_failed_checks_back_off_and_recover(clock):
    """An unreachable remote is not asked every 5 s: 10, 20, 40 s, ... at most the
    interval; the first check that works brings the short interval back."""
    sched = schedule(clock)
    sched.poke()
    failing = [True]
    acts = run_until(sched, clock, 400, waiting=True, fails=lambda: failing[0])
    gaps = gaps_of(checks_of(acts))
    assert gaps[:5] == [5.0, 10.0, 20.0, 40.0, 60.0], gaps
    assert set(gaps[5:]) <= {60.0}, gaps
    failing[0] = False
    more = run_until(sched, clock, 100, waiting=True, fails=lambda: failing[0])
    assert max(gaps_of(looks_of(more)[1:], looks_of(more)[0])) == 5.0


def test_a_new_wait_after_idle_checks_within_the_short_interval(clock):
    sched = schedule(clock)
    run_until(sched, clock, 400)  # idle: no checks
    sched.poke()
    acts = run_until(sched, clock, 11, waiting=True)
    assert checks_of(acts)[:2] == [5.0, 10.0]


def test_nobody_active_means_no_remote_checks(clock):
    sched = schedule(clock)
    acts = run_until(sched, clock, 300, waiting=False)
    assert all(a == "fetch" for _, a in acts)
    sched.wrote()  # the daemon's own write (a work context): a push, no activity
    acts = run_until(sched, clock, 300, waiting=False)
    assert acts[0][0] <= 2.5 and acts[0][1] in ("push", "fetch"), acts[:2]
    assert not checks_of(acts)


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


def test_configured_intervals_apply_at_once(clock):
    sched = schedule(clock)
    sched.set_intervals(20.0, 2.0)
    sched.poke()
    acts = run_until(sched, clock, 100, waiting=True)
    fetches = [t for t, a in acts if a == "fetch"]
    assert set(gaps_of(fetches[1:], fetches[0])) == {20.0}
    assert max(gaps_of(looks_of(acts))) == 2.0


# --------------------------------------------------------------------------- RemoteCheck

def test_remote_check_alone_keeps_the_short_interval_and_backs_off_on_failure(clock):
    """The plain helper a wait without a daemon drives itself (no threads, no git)."""
    rc = thrum.RemoteCheck(5.0, 60.0, clock=clock)
    assert not rc.due() and rc.due_in() == 5.0
    seen = []
    for outcome in [False] * 10 + ["fail"] * 4 + [True, False]:
        clock.advance(rc.due_in())
        assert rc.due()
        seen.append(clock.now)
        rc.failed() if outcome == "fail" else rc.checked(outcome)
    clock.advance(rc.due_in())
    seen.append(clock.now)
    assert gaps_of(seen[1:], seen[0]) == [5.0] * 10 + [10.0, 20.0, 40.0, 60.0, 5.0, 5.0]


def test_remote_check_can_back_off_while_nothing_changes(clock):
    rc = thrum.RemoteCheck(5.0, 60.0, clock=clock, quiet_after=6)
    seen = []
    for moved in [False] * 10 + [True, False]:
        clock.advance(rc.due_in())
        seen.append(clock.now)
        rc.checked(moved)
    clock.advance(rc.due_in())
    seen.append(clock.now)
    assert gaps_of(seen[1:], seen[0]) == [5.0] * 5 + [10.0, 20.0, 40.0, 60.0, 60.0, 5.0, 5.0]
    rc.checked(False)
    rc.reset()
    assert rc.due_in() == 5.0


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


# --------------------------------------------------------------------------- the daemon's hook

def test_a_watch_holds_the_clone_active_like_a_wait(team):
    """`Daemon.watching()` is the hook a streaming `thrum watch` holds: while it is held the
    clone counts as active (the remote check keeps sync.wait_interval), as for a blocked
    wait, and `daemon status` shows it. In process: the daemon object, not its threads."""
    store = thrum.Store(thrum.locate(str(team.path)), team.env)
    try:
        d = thrum.Daemon(store, team.env)
        st = d.status()
        assert (st["active"], st["watching"]) == (False, 0), st
        d.schedule.ACTIVE_FOR = 0.0  # only the held watch counts here, not its start
        with d.watching():
            st = d.status()
            assert (st["active"], st["watching"]) == (True, 1), st
            assert d._listening()
        st = d.status()
        assert (st["active"], st["watching"]) == (False, 0), st
    finally:
        store.close()
