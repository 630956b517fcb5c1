-- window_report.lua: a backend engine_monitor that logs each 60 s window of packet time
-- (instance "0" only, as Trisul scripts do) and counts metronome ticks per window.
local ticks = 0
TrisulPlugin = {
  id = { name = "Window report" },
  engine_monitor = {
    onbeginflush = function(engine, ts) ticks = 0 end,
    onmetronome = function(engine, ts, tick_count, tick_interval) ticks = ticks + 1 end,
    onendflush = function(engine, ts)
      if engine:instanceid() == "0" then
        T.loginfo(("window ending %s: %d metronome ticks, %d async tasks pending"):format(
          os.date("!%H:%M:%S", ts), ticks, T.async:pending_items()))
        engine:update_counter("{393B5EBC-AB41-4387-8F31-8077DB917336}", "windows", 0, 1)
      end
    end,
  },
}
