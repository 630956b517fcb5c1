-- dns_watch.lua: checks every DNS query name against blocklist.txt in a T.async worker,
-- so the (slow) file lookup never runs on the packet path. Matches become alerts,
-- every name becomes a DNS resource.
--
-- T.async data is one string. The query name comes from the packet, so it may hold ANY byte ('|', ':',
-- newlines): never join it to other fields with a separator and split it back (a crafted name would
-- then move the result to another flow or invent an alert). Each field here is length-prefixed
-- ("<length>:<bytes>"), which no byte inside a field can fool.
local DNS_RESOURCES = "{D1E27FF0-6D66-4E57-BB91-99F76BB2143E}"
local USER_ALERTS = "{B5F1DECB-51D5-4395-B71B-6FA730B772D9}"
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"

-- the query name of a DNS message starting at offset `off` of the UDP layer's bytes
local function qname(buf, off)
  local labels, pos = {}, off + 12
  while pos < buf:size() do
    local n = buf:hval_8(pos)
    if n == 0 or n >= 64 then break end
    labels[#labels + 1] = buf:tostring(pos + 1, n)
    pos = pos + n + 1
  end
  return table.concat(labels, ".")
end

TrisulPlugin = {
  id = { name = "DNS watch", description = "Blocklist check of DNS names in an async worker" },
  request_async_workers = 1,

  simplecounter = {
    protocol_guid = "{14D7AB53-CC51-47e9-8814-9C06AAE60189}",   -- UDP
    onpacket = function(engine, layer)
      if layer:getbyte(2) * 256 + layer:getbyte(3) ~= 53 then return end   -- queries only
      local name = qname(layer:rawbytes(), 8)
      if name == "" then return end
      local flow = layer:flowkey()
      T.async:schedule {
        data = #flow .. ":" .. flow .. name,       -- the flow key, length-prefixed, then the name (all the rest)
        onexecute = function(data)                 -- runs in the worker process
          local n, at = data:match("^(%d+):()")
          local qn = data:sub(at + tonumber(n))
          for line in io.lines(here .. "blocklist.txt") do
            if line == qn then return "listed" end
          end
          return "clean"
        end,
        onresult = function(engine, data, verdict)   -- back on the fast path
          local n, at = data:match("^(%d+):()")
          n = tonumber(n)
          local flow, qn = data:sub(at, at + n - 1), data:sub(at + n)
          engine:add_resource(DNS_RESOURCES, flow, qn, verdict)
          if verdict == "listed" then
            engine:add_alert(USER_ALERTS, flow, "DNS-BLOCKLIST", 2, "query for listed name " .. qn)
          end
        end,
      }
    end,
  },
}
