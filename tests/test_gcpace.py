"""The collector's pace in plug-in VMs (engine/plugins/gcpace.lua): pause 400 while the heap is small, LuaJIT's
default 200 above gcpace.LARGE_KB, checked every gcpace.CHECK_EVERY polls between batches.

The independent truth is LuaJIT itself: collectgarbage("setpause", p) returns the pause in force before the
call (Lua 5.1 manual, section 5.1), and collectgarbage("count") the heap size the rule compares.
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


def test_small_heap_runs_at_pause_400_from_boot(tmp_path):
    vm = PluginVM(helpers.write_plugin(tmp_path, PLUGIN), start_workers=False)
    try:
        assert vm.exec("return collectgarbage('count')") < 64 * 1024
        assert pause(vm) == 400
    finally:
        vm.close()


def test_pace_follows_the_heap_size_at_each_check(tmp_path):
    vm = PluginVM(helpers.write_plugin(tmp_path, PLUGIN), start_workers=False)
    try:
        every = int(vm.exec("return require('luaprobe.engine.plugins.gcpace').CHECK_EVERY"))
        polls(vm, every)                                     # aligned: the next check is `every` polls away
        vm.exec("collectgarbage(); LIMIT = collectgarbage('count') + 2048;"
                " require('luaprobe.engine.plugins.gcpace').LARGE_KB = LIMIT")
        vm.exec("BIG = {} for i = 1, 4096 do BIG[i] = string.rep(string.char(i % 251), 1024) .. i end")
        assert vm.exec("return collectgarbage('count')") > vm.exec("return LIMIT")
        polls(vm, every - 1)
        assert pause(vm) == 400                              # no check yet
        polls(vm, 1)
        assert pause(vm) == 200                              # above LARGE_KB: LuaJIT's default
        vm.exec("BIG = nil; collectgarbage()")
        assert vm.exec("return collectgarbage('count')") < vm.exec("return LIMIT")
        polls(vm, every)
        assert pause(vm) == 400                              # small again
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
        vm.exec("collectgarbage(); LIMIT = collectgarbage('count') + 2048;"
                " require('luaprobe.engine.plugins.gcpace').LARGE_KB = LIMIT")
        vm.exec("BIG = {} for i = 1, 4096 do BIG[i] = string.rep(string.char(i % 251), 1024) .. i end")
        for _ in range(every - 1):
            rt.service()
        assert pause(vm) == 400 and vm.pool is None         # not polled: no check yet
        rt.service()
        assert pause(vm) == 200                             # the 64th: polled, checked
    finally:
        rt.close()
