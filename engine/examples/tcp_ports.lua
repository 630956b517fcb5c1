-- tcp_ports.lua: packets and bytes per TCP destination port, per minute.
-- A countergroup and a simplecounter in one file, as in Trisul's counter tutorial.
TrisulPlugin = {
  id = { name = "TCP ports", description = "Packets and bytes per TCP destination port" },

  countergroup = {
    control = {
      guid = "{2B3C4D5E-6F70-4A1B-9C2D-3E4F5A6B7C8D}",
      name = "TCP ports",
      description = "Traffic by TCP destination port",
      bucketsize = 60,
    },
    meters = {
      { 0, T.K.vartype.COUNTER, 10, 0, "packets", "Packets", "pkts" },
      { 1, T.K.vartype.COUNTER, 10, 0, "bytes", "Bytes", "bytes" },
    },
  },

  simplecounter = {
    protocol_guid = "{77E462AB-2E42-42ec-9A58-C1A6821D6B31}",   -- TCP
    onpacket = function(engine, layer)
      local key = ("%d"):format(layer:getbyte(2) * 256 + layer:getbyte(3))
      engine:update_counter("{2B3C4D5E-6F70-4A1B-9C2D-3E4F5A6B7C8D}", key, 0, 1)
      engine:update_counter_bytes("{2B3C4D5E-6F70-4A1B-9C2D-3E4F5A6B7C8D}", key, 1)
    end,
  },
}
