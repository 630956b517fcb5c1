"""control.request against a supervisor that exits while a client's connection is still queued.

The supervisor closes its listening socket on the way out; a client that had connected (the connection sits in
the listen backlog, never accepted) then gets ECONNRESET on recv, or EPIPE on send.  `luaprobe status --json`
printed nothing and a traceback (the CI failure of test_daemon_shards_log_in_the_configured_format); it must
read as "not running" instead, so that status falls back to state.json."""
import select
import threading

from engine.daemon import control


def test_a_listener_closed_with_the_connection_queued_is_not_running(tmp_path):
    listener = control.listen(str(tmp_path))
    result = {}

    def client():
        try:
            result["reply"] = control.request(str(tmp_path), "status", timeout=30)
        except Exception as e:              # noqa: BLE001 - the test reads which exception came out
            result["error"] = e

    t = threading.Thread(target=client)
    t.start()
    # the queued connection makes the listener readable (Linux unix sockets); never accept it
    assert select.select([listener], [], [], 30)[0]
    listener.close()
    t.join(30)
    assert not t.is_alive()
    assert "reply" not in result
    assert isinstance(result.get("error"), control.NotRunning), repr(result.get("error"))
