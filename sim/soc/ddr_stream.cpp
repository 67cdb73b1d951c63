// The DDR model alone, streamed by ideal masters: what bandwidth it gives N ports.
//
// Built by m3vit.sim.ddr_stream into a small shared library (no Verilated design) and called
// through ctypes. Each active port's master keeps its port full: it offers a read burst of
// `burst_beats` beats every cycle (sequential addresses, never crossing 4 KiB), takes every
// R beat at once, and with `write` also writes the same way. It measures what the model
// delivers, to compare with the measurements the defaults come from (docs/simulation.md).

#include <cstdint>
#include <vector>

#include "ddr_model.h"

using m3vit::AxiMasterOut;
using m3vit::DdrSystem;
using m3vit::DdrTiming;

extern "C" {

// Streams `cycles` cycles on the ports whose bit is set in `active_mask`; writes each port's
// bytes read and written to read_bytes[p] and write_bytes[p] (n_ports entries each).
// Returns 0, or -1 for a bad argument.
int ddr_stream(unsigned n_ports, unsigned bus_bytes, unsigned read_latency,
               unsigned write_latency, unsigned max_outstanding, double bytes_per_cycle,
               double aggregate, double group, unsigned group_mask, unsigned active_mask,
               unsigned burst_beats, int write, uint64_t cycles, uint64_t *read_bytes,
               uint64_t *write_bytes) {
    if (n_ports == 0 || n_ports > 8 || bus_bytes == 0 || bus_bytes > 64 ||
        (bus_bytes & (bus_bytes - 1)) || burst_beats == 0 || burst_beats > 256 ||
        burst_beats * bus_bytes > 4096)
        return -1;
    DdrTiming timing;
    timing.read_latency = read_latency;
    timing.write_latency = write_latency;
    timing.max_outstanding = max_outstanding;
    timing.bytes_per_cycle = bytes_per_cycle;
    const uint64_t region = 1 << 20;  // each port streams through its own 1 MiB
    DdrSystem ddr(region * n_ports, n_ports, bus_bytes, timing, aggregate, group, group_mask);
    unsigned size = 0;
    while ((1u << size) < bus_bytes) size++;
    std::vector<AxiMasterOut> masters(n_ports);
    std::vector<uint64_t> next_read(n_ports), next_write(n_ports);
    std::vector<unsigned> w_beat(n_ports, 0), w_bursts(n_ports, 0);
    const uint64_t burst_bytes = static_cast<uint64_t>(burst_beats) * bus_bytes;
    for (uint64_t now = 0; now < cycles; now++) {
        for (unsigned p = 0; p < n_ports; p++) {
            AxiMasterOut &m = masters[p];
            const bool active = active_mask >> p & 1;
            m = AxiMasterOut{};
            m.arvalid = active;
            m.araddr = p * region + next_read[p] % region;
            m.arlen = burst_beats - 1;
            m.arsize = size;
            m.arburst = m3vit::INCR;
            m.rready = true;
            m.awvalid = active && write;
            m.awaddr = p * region + next_write[p] % region;
            m.awlen = burst_beats - 1;
            m.awsize = size;
            m.awburst = m3vit::INCR;
            // W beats of bursts whose AW was accepted, in order.
            m.wvalid = active && write && w_bursts[p] > 0;
            m.wstrb = (bus_bytes == 64) ? ~0ull : ((1ull << bus_bytes) - 1);
            m.wlast = w_beat[p] == burst_beats - 1;
            m.bready = true;
        }
        // The handshakes the slave's current outputs complete, before it moves on.
        for (unsigned p = 0; p < n_ports; p++) {
            const m3vit::AxiSlaveOut &s = ddr.port(p).out();
            const AxiMasterOut &m = masters[p];
            if (m.arvalid && s.arready) next_read[p] += burst_bytes;
            if (m.awvalid && s.awready) {
                next_write[p] += burst_bytes;
                w_bursts[p]++;
            }
            if (m.wvalid && s.wready) {
                if (++w_beat[p] == burst_beats) {
                    w_beat[p] = 0;
                    w_bursts[p]--;
                }
            }
        }
        ddr.clock(masters.data(), now);
    }
    for (unsigned p = 0; p < n_ports; p++) {
        read_bytes[p] = ddr.port(p).stat(m3vit::DDR_READ_BYTES);
        write_bytes[p] = ddr.port(p).stat(m3vit::DDR_WRITE_BYTES);
    }
    return 0;
}

}  // extern "C"
