"""Fixtures shared by all tests; the leak guard is autouse (see tests/helpers.py)."""
from __future__ import annotations

import os

import pytest

from luaprobe.shm import segment
from tests import helpers


def _ignore(signum, frame):
    """A handler that does nothing: this process keeps ignoring the signal, the processes it starts do not."""


def pytest_configure(config):
    """Every process a test starts begins with SIGINT, SIGQUIT and SIGHUP at their defaults.

    A non-interactive shell starts a background job (`pytest ... &`, a CI runner's subshell) with SIGINT and
    SIGQUIT ignored, nohup ignores SIGHUP, and an ignored disposition is inherited through fork and exec.
    luaprobe rightly keeps a stop signal it was started with ignored (shm/exits.py install_early_stop, as
    shells and nohup expect), so every test that stops a run with SIGINT / SIGHUP then waited for nothing: in a
    full run started that way test_live's four SIGINT stops failed ("luaprobe did not stop after SIGINT") and
    the loadtest's points hung until the test timed out, while each passed in the foreground.  The tests are
    about luaprobe's handling of a signal it was given, not about the caller's dispositions.  A Python handler
    (unlike SIG_IGN) is reset to the default at exec, so this process still ignores what it was told to."""
    import signal
    for s in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        if signal.getsignal(s) == signal.SIG_IGN:
            signal.signal(s, _ignore)


@pytest.fixture(autouse=True, scope="session")
def daemon_registry(tmp_path_factory):
    """Daemons started by tests register in a private directory, not the user's (engine/control.py)."""
    os.environ["LUAPROBE_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))
    yield


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Kill new child processes and unlink new segments after each test; fail a passing test that leaked."""
    before_children = {p.pid for p in helpers.children()}
    before_segments = set(segment.list_segments())
    yield
    new_children = [p for p in helpers.children() if p.pid not in before_children]
    leaked_pids = helpers.kill_tree(new_children)
    pids = {os.getpid()} | {p.pid for p in new_children}
    leaked_segments = sorted(n for n in set(segment.list_segments()) - before_segments
                             if segment.owner_pid(n) in pids)
    for name in leaked_segments:
        segment.unlink(name)
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.passed and (leaked_pids or leaked_segments):
        pytest.fail(f"test leaked processes {leaked_pids} / segments {leaked_segments}")


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Expose each phase's report to fixtures (request.node.rep_call)."""
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def runtime_factory():
    """Create AsyncRuntimes that are always shut down (no drain) at teardown."""
    from luaprobe.engine.plugins.asyncruntime import AsyncRuntime
    made = []

    def make(**cfg):
        from luaprobe.workers.pool import AsyncConfig
        lua_path = cfg.pop("lua_path", ())
        rt = AsyncRuntime(AsyncConfig(**cfg), lua_path=lua_path)
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()
