"""The collector's pace in plug-in VMs (engine/plugins/gcpace.lua): pause = clamp(100 * CEILING_KB / live heap,
200, 1000) in steps of 50, where the live heap is the heap when the last cycle finished (the heap now before the
first), checked every gcpace.CHECK_EVERY polls between batches.

The independent truth is LuaJIT itself: collectgarbage("setpause", p) returns the pause in force before the
call (Lua 5.1 manual, section 5.1), and collectgarbage("count") right after a full collectgarbage() the live heap
the rule divides by.
"""
from __future__ import annotations

from luaprobe.engine.plugins.vm import PluginVM
from tests import helpers

PLUGIN = 'TrisulPlugin = { id = { name = "gc" } }\n'


def pause(vm) -> int:
    """The pause in force (read by setting it and setting it back)."""
    return int(vm.exec('local p = collectgarbage("setpause", 100); collectgarbage("setpause", p); return p'))


def polls(vm, n: int) -> None:
    for _ in range(n):
        vm.poll()


def expected(live_kb: float, ceiling_kb: float) -> int:
    """The rule, written out: steps of 50, between 200 and 1000."""
    p = int(100 * ceiling_kb / live_kb // 50 * 50)
    return max(200, min(1000, p))


def test_small_heap_runs_at_pause_1000_from_boot(tmp_path):
    vm = PluginVM(helpers.write_plugin(tmp_path, PLUGIN), start_workers=False)
    try:
        assert vm.exec("return collectgarbage('count')") < 64 * 1024 / 10
        assert pause(vm) == 1000
    finally:
        vm.close()


def test_live_heap_is_the_heap_when_the_last_cycle_finished(tmp_path):
    vm = PluginVM(helpers.write_plugin(tmp_path, PLUGIN), start_workers=False)
    try:
        live, now = vm.exec("collectgarbage(); return require('luaprobe.engine.plugins.gcpace').live_kb(),"
                            " collectgarbage('count')")
        assert abs(live - now) < 16                          # KiB: the finaliser ran at the end of that cycle
        vm.exec("BIG = {} for i = 1, 2048 do BIG[i] = string.rep(string.char(i % 251), 1024) .. i end")
        assert vm.exec("return require('luaprobe.engine.plugins.gcpace').live_kb()") == live   # no cycle yet
        live2, now2 = vm.exec("collectgarbage(); return require('luaprobe.engine.plugins.gcpace').live_kb(),"
                              " collectgarbage('count')")
        assert abs(live2 - now2) < 16 and live2 > live + 2000
    finally:
        vm.close()


def test_pace_follows_the_heap_size_at_each_check(tmp_path):
    vm = PluginVM(helpers.write_plugin(tmp_path, PLUGIN), start_workers=False)
    try:
        every = int(vm.exec("return require('luaprobe.engine.plugins.gcpace').CHECK_EVERY"))
        polls(vm, every)                                     # aligned: the next check is `every` polls away
        vm.exec("collectgarbage(); CEIL = collectgarbage('count') + 2048;"
                " require('luaprobe.engine.plugins.gcpace').CEILING_KB = CEIL")
        ceil = vm.exec("return CEIL")
        vm.exec("BIG = {} for i = 1, 4096 do BIG[i] = string.rep(string.char(i % 251), 1024) .. i end")
        live = vm.exec("collectgarbage(); return collectgarbage('count')")
        assert live > ceil and expected(live, ceil) == 200
        polls(vm, every - 1)
        assert pause(vm) == 1000                             # no check yet
        polls(vm, 1)
        assert pause(vm) == 200                              # live above the ceiling / 2: LuaJIT's default
        live = vm.exec("BIG = nil; collectgarbage(); return collectgarbage('count')")
        polls(vm, every)
        assert pause(vm) == expected(live, ceil) > 200       # small again
    finally:
        vm.close()


def test_fast_path_polls_a_vm_without_workers_every_64th_time_with_the_check(tmp_path):
    """AsyncRuntime.service (once per batch) skips the lupa call for a VM that has no worker pool, except every
    CHECK_EVERY-th time, when the pace is checked: LuaJIT's own pause and heap size show the check happens on that
    call and not before; the VM's poll counter shows the skipped calls."""
    from luaprobe.engine.plugins.asyncruntime import AsyncRuntime
    rt = AsyncRuntime()
    try:
        vm = rt.load(helpers.write_plugin(tmp_path, PLUGIN), start_workers="lazy")
        every = int(vm.exec("return require('luaprobe.engine.plugins.gcpace').CHECK_EVERY"))
        before = vm.lua.eval("function(a) return a.polls end")(vm.async_obj)
        for _ in range(every):
            rt.service()
        assert vm.lua.eval("function(a) return a.polls end")(vm.async_obj) == before + 1
        vm.exec("collectgarbage(); CEIL = collectgarbage('count') + 2048;"
                " require('luaprobe.engine.plugins.gcpace').CEILING_KB = CEIL")
        vm.exec("BIG = {} for i = 1, 4096 do BIG[i] = string.rep(string.char(i % 251), 1024) .. i end;"
                " collectgarbage()")
        for _ in range(every - 1):
            rt.service()
        assert pause(vm) == 1000 and vm.pool is None        # not polled: no check yet
        rt.service()
        assert pause(vm) == 200                             # the 64th: polled, checked
    finally:
        rt.close()


def test_memory_limit_caps_the_ceiling_at_half_the_limit(tmp_path):
    """LuaJIT does not collect when an allocation fails: with --plugin-memory-mb the heap before a cycle stays
    below half the limit (a 2 MiB limit: ceiling 1 MiB, a few times this VM's live heap)."""
    vm = PluginVM(helpers.write_plugin(tmp_path, PLUGIN), start_workers=False)
    try:
        vm.lua.eval("function(h, m, l) h:set_memory_limit(m, l) end")(vm.host, 2, b"gc.lua")
        live = vm.exec("collectgarbage(); return collectgarbage('count')")
        polls(vm, int(vm.exec("return require('luaprobe.engine.plugins.gcpace').CHECK_EVERY")))
        assert pause(vm) == expected(live, 1024) < 1000                # without the limit: 1000
    finally:
        vm.close()


def test_the_live_heap_estimate_survives_a_plugin_removing_newproxy(tmp_path):
    """The finaliser re-arms itself with the newproxy it captured at load: a plug-in's globals do not break it."""
    vm = PluginVM(helpers.write_plugin(tmp_path, 'newproxy = nil\n' + PLUGIN), start_workers=False)
    try:
        before = vm.exec("collectgarbage(); return require('luaprobe.engine.plugins.gcpace').live_kb()")
        vm.exec("BIG = {} for i = 1, 2048 do BIG[i] = string.rep(string.char(i % 251), 1024) .. i end")
        after, now = vm.exec("collectgarbage(); collectgarbage(); return"
                             " require('luaprobe.engine.plugins.gcpace').live_kb(), collectgarbage('count')")
        assert after > before + 2000 and abs(after - now) < 16
    finally:
        vm.close()
