// The Verilated accelerator top, its DDR and an AXI4-Lite host in one clocked C++ loop.
//
// Built by m3vit.sim.soc into a shared library and driven through the extern "C" API at the
// end of this file with ctypes: Python is called once per register access or per run, never
// per clock cycle.
//
// One cycle (step()):
//   1. drive the DUT's inputs from the DDR model's and the host's registered state;
//   2. clk = 0, eval: the DUT's outputs settle for this cycle (they may depend on its inputs);
//   3. sample the DUT's outputs: these and the inputs of step 1 are what the rising edge sees;
//   4. clk = 1, eval: the rising edge;
//   5. advance the DDR model and the host by the handshakes sampled in step 3.
// Trace samples are taken after steps 2 (time 2n) and 4 (time 2n + 1).
//
// Compile-time definitions from the build: SOC_BUS_BYTES (the AXI4 masters' data width in
// bytes), SOC_N_PORTS (how many AXI4 master ports the top has, each on its own DDR port),
// SOC_TRACE_VCD or SOC_TRACE_FST (a trace build), SOC_COVERAGE (line and toggle coverage).

#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "Vm3vit_accel.h"
#include "ddr_model.h"
#include "verilated.h"
#if defined(SOC_COVERAGE)
#include "verilated_cov.h"
#endif
#if defined(SOC_TRACE_FST)
#include "verilated_fst_c.h"
using TraceFile = VerilatedFstC;
#elif defined(SOC_TRACE_VCD)
#include "verilated_vcd_c.h"
using TraceFile = VerilatedVcdC;
#endif

#ifndef SOC_BUS_BYTES
#error "SOC_BUS_BYTES must be defined by the build"
#endif
#ifndef SOC_N_PORTS
#define SOC_N_PORTS 1
#endif

// Amaranth names ports `bus__member`; Verilator escapes the double underscore as `___05F`.
#define PORT(bus, member) bus##___05F##member

// The top's AXI4 master ports, X(index, name) each, in the order of the DDR model's ports.
#if SOC_N_PORTS == 1
#define SOC_FOR_EACH_MASTER(X) X(0, m_axi)
#elif SOC_N_PORTS == 2
#define SOC_FOR_EACH_MASTER(X) X(0, m_axi) X(1, m_axi1)
#elif SOC_N_PORTS == 3
#define SOC_FOR_EACH_MASTER(X) X(0, m_axi) X(1, m_axi1) X(2, m_axi2)
#elif SOC_N_PORTS == 4
#define SOC_FOR_EACH_MASTER(X) X(0, m_axi) X(1, m_axi1) X(2, m_axi2) X(3, m_axi3)
#else
#error "SOC_N_PORTS must be 1 to 4 (the ZCU104 has four HP ports)"
#endif

using m3vit::AxiMasterOut;
using m3vit::DdrSystem;
using m3vit::DdrTiming;

namespace {

// The bus data ports are VlWide<N> above 64 bits, QData/IData below: one overload each.
template <std::size_t N>
void put_bytes(VlWide<N> &port, const uint8_t *bytes) {
    for (std::size_t i = 0; i < N; i++) {
        EData word;
        std::memcpy(&word, bytes + 4 * i, 4);  // little-endian host, as the bus
        port[i] = word;
    }
}
template <std::size_t N>
void get_bytes(const VlWide<N> &port, uint8_t *bytes) {
    for (std::size_t i = 0; i < N; i++) {
        const EData word = port[i];
        std::memcpy(bytes + 4 * i, &word, 4);
    }
}
template <typename Int>
void put_bytes(Int &port, const uint8_t *bytes) {
    Int value = 0;
    std::memcpy(&value, bytes, SOC_BUS_BYTES);
    port = value;
}
template <typename Int>
void get_bytes(const Int &port, uint8_t *bytes) {
    const Int value = port;
    std::memcpy(bytes, &value, SOC_BUS_BYTES);
}

// The AXI4-Lite host: one read and one write at a time, valids held until their handshakes.
struct AxiLiteHost {
    bool awvalid = false, wvalid = false, bready = false, arvalid = false, rready = false;
    uint32_t awaddr = 0, wdata = 0, araddr = 0;
    bool b_done = false, r_done = false;
    uint32_t bresp = 0, rresp = 0, rdata = 0;
};

struct Soc {
    std::unique_ptr<VerilatedContext> context;
    std::unique_ptr<Vm3vit_accel> top;
    DdrSystem ddr;
    AxiLiteHost host;
    uint64_t cycle = 0;
    bool in_reset = false;
#if defined(SOC_TRACE_FST) || defined(SOC_TRACE_VCD)
    std::unique_ptr<TraceFile> trace;
#endif
    // Cycles [trace_start, trace_stop) are dumped: a whole image is ~1 M cycles, ~11 GB of VCD.
    uint64_t trace_start = 0, trace_stop = UINT64_MAX;

    Soc(uint64_t ddr_bytes, DdrTiming timing, double aggregate, double group,
        unsigned group_mask)
        : context(new VerilatedContext),
          ddr(ddr_bytes, SOC_N_PORTS, SOC_BUS_BYTES, timing, aggregate, group, group_mask) {
#if defined(SOC_TRACE_FST) || defined(SOC_TRACE_VCD)
        context->traceEverOn(true);
#endif
        top.reset(new Vm3vit_accel{context.get(), "m3vit_accel"});
    }

    void dump(uint64_t time) {
#if defined(SOC_TRACE_FST) || defined(SOC_TRACE_VCD)
        if (trace && cycle >= trace_start && cycle < trace_stop) trace->dump(time);
#else
        (void)time;
#endif
    }

    // One master's inputs from its DDR port's registered outputs.
    template <typename Top>
    static void drive_master(Top &t, const m3vit::AxiSlaveOut &d, unsigned index) {
        switch (index) {
#define SOC_DRIVE(I, BUS)                    \
    case I:                                  \
        t.PORT(BUS, arready) = d.arready;    \
        t.PORT(BUS, rvalid) = d.rvalid;      \
        put_bytes(t.PORT(BUS, rdata), d.rdata); \
        t.PORT(BUS, rresp) = d.rresp;        \
        t.PORT(BUS, rid) = d.rid;            \
        t.PORT(BUS, rlast) = d.rlast;        \
        t.PORT(BUS, awready) = d.awready;    \
        t.PORT(BUS, wready) = d.wready;      \
        t.PORT(BUS, bvalid) = d.bvalid;      \
        t.PORT(BUS, bresp) = d.bresp;        \
        t.PORT(BUS, bid) = d.bid;            \
        break;
            SOC_FOR_EACH_MASTER(SOC_DRIVE)
#undef SOC_DRIVE
        }
    }

    // What one master drives this cycle.
    template <typename Top>
    static AxiMasterOut sample_master(const Top &t, unsigned index) {
        AxiMasterOut m;
        switch (index) {
#define SOC_SAMPLE(I, BUS)                                       \
    case I:                                                      \
        m.arvalid = t.PORT(BUS, arvalid);                        \
        m.araddr = t.PORT(BUS, araddr);                          \
        m.arlen = t.PORT(BUS, arlen);                            \
        m.arsize = t.PORT(BUS, arsize);                          \
        m.arburst = t.PORT(BUS, arburst);                        \
        m.arid = t.PORT(BUS, arid);                              \
        m.rready = t.PORT(BUS, rready);                          \
        m.awvalid = t.PORT(BUS, awvalid);                        \
        m.awaddr = t.PORT(BUS, awaddr);                          \
        m.awlen = t.PORT(BUS, awlen);                            \
        m.awsize = t.PORT(BUS, awsize);                          \
        m.awburst = t.PORT(BUS, awburst);                        \
        m.awid = t.PORT(BUS, awid);                              \
        m.wvalid = t.PORT(BUS, wvalid);                          \
        if (m.wvalid) get_bytes(t.PORT(BUS, wdata), m.wdata);    \
        m.wstrb = t.PORT(BUS, wstrb);                            \
        m.wlast = t.PORT(BUS, wlast);                            \
        m.bready = t.PORT(BUS, bready);                          \
        break;
            SOC_FOR_EACH_MASTER(SOC_SAMPLE)
#undef SOC_SAMPLE
        }
        return m;
    }

    void drive() {
        Vm3vit_accel &t = *top;
        for (unsigned p = 0; p < SOC_N_PORTS; p++) drive_master(t, ddr.port(p).out(), p);
        t.PORT(s_axil, awvalid) = host.awvalid;
        t.PORT(s_axil, awaddr) = host.awaddr;
        t.PORT(s_axil, wvalid) = host.wvalid;
        t.PORT(s_axil, wdata) = host.wdata;
        t.PORT(s_axil, wstrb) = 0xF;
        t.PORT(s_axil, bready) = host.bready;
        t.PORT(s_axil, arvalid) = host.arvalid;
        t.PORT(s_axil, araddr) = host.araddr;
        t.PORT(s_axil, rready) = host.rready;
    }

    void step() {
        Vm3vit_accel &t = *top;
        drive();
        t.rst = in_reset;
        t.clk = 0;
        t.eval();
        dump(2 * cycle);

        AxiMasterOut masters[SOC_N_PORTS];
        for (unsigned p = 0; p < SOC_N_PORTS; p++) masters[p] = sample_master(t, p);
        const bool aw_hs = host.awvalid && t.PORT(s_axil, awready);
        const bool w_hs = host.wvalid && t.PORT(s_axil, wready);
        const bool b_hs = host.bready && t.PORT(s_axil, bvalid);
        const bool ar_hs = host.arvalid && t.PORT(s_axil, arready);
        const bool r_hs = host.rready && t.PORT(s_axil, rvalid);
        const uint32_t bresp = t.PORT(s_axil, bresp);
        const uint32_t rresp = t.PORT(s_axil, rresp);
        const uint32_t rdata = t.PORT(s_axil, rdata);

        t.clk = 1;
        t.eval();
        dump(2 * cycle + 1);

        // In reset the DUT's outputs are not meaningful and the DDR holds still.
        if (!in_reset) ddr.clock(masters, cycle);
        if (aw_hs) host.awvalid = false;
        if (w_hs) host.wvalid = false;
        if (b_hs) {
            host.bready = false;
            host.b_done = true;
            host.bresp = bresp;
        }
        if (ar_hs) host.arvalid = false;
        if (r_hs) {
            host.rready = false;
            host.r_done = true;
            host.rresp = rresp;
            host.rdata = rdata;
        }
        cycle++;
    }

    void reset(unsigned cycles) {
        host = AxiLiteHost{};
        ddr.reset();
        in_reset = true;
        for (unsigned i = 0; i < cycles; i++) step();
        in_reset = false;
    }
};

}  // namespace

extern "C" {

// Which build this is, so Python can check it loaded what it asked for.
int soc_bus_bytes() { return SOC_BUS_BYTES; }

int soc_n_ports() { return SOC_N_PORTS; }

int soc_trace_kind() {
#if defined(SOC_TRACE_FST)
    return 2;
#elif defined(SOC_TRACE_VCD)
    return 1;
#else
    return 0;
#endif
}

const char *soc_stat_names() { return m3vit::STAT_NAMES; }

int soc_n_stats() { return m3vit::N_STATS; }

// trace_path may be NULL; it is ignored by a build without tracing.
// Rates in bytes per cycle; `aggregate` and `group` 0 = no cap; `group_mask` bit p: port p
// shares the group cap.
void *soc_new(uint64_t ddr_bytes, unsigned read_latency, unsigned write_latency,
              unsigned max_outstanding, double bytes_per_cycle, double aggregate, double group,
              unsigned group_mask, const char *trace_path) {
    DdrTiming timing;
    timing.read_latency = read_latency;
    timing.write_latency = write_latency;
    timing.max_outstanding = max_outstanding;
    timing.bytes_per_cycle = bytes_per_cycle;
    Soc *soc = new Soc(ddr_bytes, timing, aggregate, group, group_mask);
#if defined(SOC_TRACE_FST) || defined(SOC_TRACE_VCD)
    if (trace_path && *trace_path) {
        soc->trace.reset(new TraceFile);
        soc->top->trace(soc->trace.get(), 99);
        soc->trace->open(trace_path);
    }
#else
    (void)trace_path;
#endif
    return soc;
}

// 1 when this build counts Verilator line and toggle coverage (SOC_COVERAGE).
int soc_coverage() {
#if defined(SOC_COVERAGE)
    return 1;
#else
    return 0;
#endif
}

// Write the model's coverage counts so far (a coverage build; a no-op otherwise).
void soc_write_coverage(void *handle, const char *path) {
#if defined(SOC_COVERAGE)
    static_cast<Soc *>(handle)->context->coveragep()->write(path);
#else
    (void)handle;
    (void)path;
#endif
}

void soc_free(void *handle) {
    Soc *soc = static_cast<Soc *>(handle);
#if defined(SOC_TRACE_FST) || defined(SOC_TRACE_VCD)
    if (soc->trace) soc->trace->close();
#endif
    soc->top->final();
    delete soc;
}

void soc_reset(void *handle, unsigned cycles) { static_cast<Soc *>(handle)->reset(cycles); }

// Returns the BRESP (0 = OKAY), or -1 if no response came within `timeout` cycles.
int soc_reg_write(void *handle, uint32_t address, uint32_t value, unsigned timeout) {
    Soc &soc = *static_cast<Soc *>(handle);
    soc.host.awvalid = soc.host.wvalid = soc.host.bready = true;
    soc.host.awaddr = address;
    soc.host.wdata = value;
    soc.host.b_done = false;
    for (unsigned i = 0; i < timeout && !soc.host.b_done; i++) soc.step();
    if (soc.host.b_done) return static_cast<int>(soc.host.bresp);
    soc.host.awvalid = soc.host.wvalid = soc.host.bready = false;
    return -1;
}

// Returns the RRESP (0 = OKAY) with the data in *value, or -1 on timeout.
int soc_reg_read(void *handle, uint32_t address, uint32_t *value, unsigned timeout) {
    Soc &soc = *static_cast<Soc *>(handle);
    soc.host.arvalid = soc.host.rready = true;
    soc.host.araddr = address;
    soc.host.r_done = false;
    for (unsigned i = 0; i < timeout && !soc.host.r_done; i++) soc.step();
    if (!soc.host.r_done) {
        soc.host.arvalid = soc.host.rready = false;
        return -1;
    }
    *value = soc.host.rdata;
    return static_cast<int>(soc.host.rresp);
}

// Backdoor DDR access: no simulated time. Returns -1 when out of range (nothing copied).
int soc_ddr_write(void *handle, uint64_t address, const uint8_t *data, uint64_t size) {
    DdrSystem &ddr = static_cast<Soc *>(handle)->ddr;
    if (address > ddr.size() || size > ddr.size() - address) return -1;
    std::memcpy(ddr.data() + address, data, size);
    return 0;
}

int soc_ddr_read(void *handle, uint64_t address, uint8_t *data, uint64_t size) {
    DdrSystem &ddr = static_cast<Soc *>(handle)->ddr;
    if (address > ddr.size() || size > ddr.size() - address) return -1;
    std::memcpy(data, ddr.data() + address, size);
    return 0;
}

// Steps until irq is high or max_cycles have passed; returns the cycles stepped.
uint64_t soc_run(void *handle, uint64_t max_cycles) {
    Soc &soc = *static_cast<Soc *>(handle);
    uint64_t n = 0;
    while (n < max_cycles && !soc.top->irq) {
        soc.step();
        n++;
    }
#if defined(SOC_TRACE_FST) || defined(SOC_TRACE_VCD)
    if (soc.trace) soc.trace->flush();  // so a trace can be opened while the model lives
#endif
    return n;
}

void soc_set_trace_window(void *handle, uint64_t start, uint64_t stop) {
    Soc &soc = *static_cast<Soc *>(handle);
    soc.trace_start = start;
    soc.trace_stop = stop;
}

int soc_irq(void *handle) { return static_cast<Soc *>(handle)->top->irq; }

uint64_t soc_cycle(void *handle) { return static_cast<Soc *>(handle)->cycle; }

void soc_set_hang_reads(void *handle, int hang) {
    static_cast<Soc *>(handle)->ddr.set_hang_reads(hang != 0);
}

int soc_hang_reads(void *handle) { return static_cast<Soc *>(handle)->ddr.hang_reads(); }

// Replaces the DDR's fault plan (m3vit::DdrFaults; all zero / -1: none). Probabilities are
// per cycle; the indices count from this call over all ports, -1 = never.
void soc_set_faults(void *handle, uint64_t seed, unsigned read_jitter, unsigned write_jitter,
                    double ar_stall, double aw_stall, double w_stall, double r_gap,
                    double b_gap, int64_t read_error_beat, int64_t write_error_response,
                    unsigned error_resp, int64_t hang_read_burst) {
    m3vit::DdrFaults faults;
    faults.seed = seed;
    faults.read_jitter = read_jitter;
    faults.write_jitter = write_jitter;
    faults.ar_stall = ar_stall;
    faults.aw_stall = aw_stall;
    faults.w_stall = w_stall;
    faults.r_gap = r_gap;
    faults.b_gap = b_gap;
    faults.read_error_beat = read_error_beat;
    faults.write_error_response = write_error_response;
    faults.error_resp = error_resp;
    faults.hang_read_burst = hang_read_burst;
    static_cast<Soc *>(handle)->ddr.set_faults(faults);
}

// The model cycle at which each once-only fault reached the master since the faults were set
// (read error beat presented, error B presented, hung AR accepted), UINT64_MAX if it has not.
void soc_fault_cycles(void *handle, uint64_t *out) {
    const DdrSystem &ddr = static_cast<Soc *>(handle)->ddr;
    for (unsigned i = 0; i < 3; i++) out[i] = ddr.fault_fired_at(i);
}

// The counters of DDR port `port` (N_STATS of them); returns -1 for no such port.
int soc_stats(void *handle, unsigned port, uint64_t *out) {
    const DdrSystem &ddr = static_cast<Soc *>(handle)->ddr;
    if (port >= ddr.n_ports()) return -1;
    for (unsigned i = 0; i < m3vit::N_STATS; i++) out[i] = ddr.port(port).stat(i);
    return 0;
}

}  // extern "C"
