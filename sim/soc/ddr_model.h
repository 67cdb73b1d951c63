// DDR behind N AXI4 slave ports (the PS's HP ports): one flat byte array at address 0, a
// cycle-level timing model per port and bandwidth caps the ports share.
//
// Each port (DdrPort) is clocked by the SoC loop once per rising edge. `clock()` receives what the
// master drove during the cycle that ends at that edge; the slave's own outputs for that cycle
// are in `out`. It completes the cycle's handshakes, then computes `out` for the next cycle.
// Outputs depend only on the model's state (registered), never combinationally on the
// master's outputs, which AXI allows and which keeps the two-phase loop simple.
//
// Timing (all in cycles of the accelerator clock):
//  * read_latency: AR handshake -> first R beat of that burst (at least 1). Bursts accepted
//    back to back overlap their latencies, as a pipelined DDR controller does;
//  * write_latency: last W beat -> B (at least 1);
//  * max_outstanding: bursts in flight per direction; AR/AW ready drops when full. A read
//    burst is in flight from AR to its last R beat, a write burst from AW to its B;
//  * bytes_per_cycle: sustained bandwidth of each direction of one port, a token bucket per
//    direction (R and W are separate AXI channels and the port's peak is per direction). A
//    beat costs its size in bytes; the bucket holds at most one beat plus one cycle's worth,
//    so an idle period cannot be spent later as a burst faster than the rate.
//
// Shared caps (DdrShared, one per memory): an aggregate bucket that every beat of every port,
// read or write, also pays (the PS DDR4 is one 64-bit bus behind the ports: measured, three
// HP ports read ~14.2 GB/s together and four only ~12.5), and a group bucket paid by the ports
// in `group_mask` (HP1 and HP2 share one DDR-controller port, XPI 4: ~8 GB/s together). A rate
// of 0 means no cap. Ports are served in an order that rotates every cycle, so no port
// starves another when a shared cap binds.
//
// Responses: a beat that touches a byte at or beyond the memory size is answered SLVERR
// (reads return zero data, writes drop the beat), so the master's error path is reachable.
// INCR, FIXED and WRAP bursts are honoured; arsize/awsize narrower than the bus place bytes
// on their lanes. R beats are returned in order (always legal: in-order per ID suffices).
// W beats are accepted only for a burst whose AW was accepted (a slave may wait for AW).
//
// Faults (DdrFaults, all off by default, so the timing above is untouched): what a real
// interconnect may do and the master must survive, drawn from a seeded generator so a run is
// reproducible to the cycle. Extra random latency on each read burst and each B; ARREADY,
// AWREADY and WREADY withheld in random cycles (back-pressure on the master's channels);
// idle cycles before R beats and B responses (on the slave's); an error response (SLVERR or
// DECERR) on the k-th read beat or k-th write response; and a read burst that is never
// answered (R stays in order, so every read behind it waits too). The k-th is counted over all
// ports from the moment the faults were set; each fires once.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <deque>
#include <iterator>
#include <vector>

namespace m3vit {

struct DdrTiming {
    unsigned read_latency = 40;
    unsigned write_latency = 24;
    unsigned max_outstanding = 8;
    double bytes_per_cycle = 16.0;
};

// Faults to inject; the defaults inject none. An index of -1 means never.
struct DdrFaults {
    uint64_t seed = 0;
    unsigned read_jitter = 0;   // each read burst's latency + uniform 0..read_jitter cycles
    unsigned write_jitter = 0;  // each B's latency + uniform 0..write_jitter cycles
    double ar_stall = 0.0;      // probability ARREADY is withheld in a cycle it would be high
    double aw_stall = 0.0;
    double w_stall = 0.0;
    double r_gap = 0.0;         // probability a ready R beat is held back a cycle
    double b_gap = 0.0;         // the same for a ready B
    int64_t read_error_beat = -1;       // this read beat (0 = the next) is answered error_resp
    int64_t write_error_response = -1;  // this B (0 = the next) is answered error_resp
    unsigned error_resp = 2;            // SLVERR (2) or DECERR (3)
    int64_t hang_read_burst = -1;       // this read burst (0 = the next AR) is never answered
};

// splitmix64 (Steele, Lea and Flood, OOPSLA 2014): written out rather than std::mt19937 with a
// std:: distribution, whose results differ between standard libraries; a seed must give the
// same run everywhere.
struct FaultRng {
    uint64_t state = 0;
    uint64_t next() {
        uint64_t z = (state += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    // No draw at all for a probability of 0: a model without faults never touches the state.
    bool chance(double p) { return p > 0.0 && static_cast<double>(next() >> 11) * 0x1.0p-53 < p; }
    unsigned upto(unsigned n) { return n ? static_cast<unsigned>(next() % (uint64_t{n} + 1)) : 0; }
};

// A token bucket: `rate` bytes per cycle, at most one beat plus one cycle's worth banked.
struct Bucket {
    double rate = 0.0;  // 0: unlimited
    double cap = 0.0;
    double tokens = 0.0;
    void configure(double bytes_per_cycle, unsigned bus_bytes) {
        rate = bytes_per_cycle;
        cap = bus_bytes + bytes_per_cycle;
        tokens = 0.0;
    }
    void refill() { tokens = std::min(tokens + rate, cap); }
    bool has(unsigned bytes) const { return rate <= 0.0 || tokens >= bytes; }
    void take(unsigned bytes) {
        if (rate > 0.0) tokens -= bytes;
    }
    void give_back(unsigned bytes) {
        if (rate > 0.0) tokens = std::min(tokens + bytes, cap);
    }
};

// The bandwidth every port shares: the DDR's aggregate and one group of ports (HP1 + HP2).
struct DdrShared {
    Bucket aggregate;
    Bucket group;
    unsigned group_mask = 0;  // bit p: port p pays the group bucket
    // The faults, and what every port has done since they were set: the k-th beat, response
    // or burst of a DdrFaults is counted over all ports.
    DdrFaults faults;
    int64_t read_beats = 0, write_responses = 0, read_bursts = 0;
    // The cycle each indexed fault reached the master (FaultEvent order; UINT64_MAX: not yet).
    uint64_t fired_at[3] = {UINT64_MAX, UINT64_MAX, UINT64_MAX};
    void refill() {
        aggregate.refill();
        group.refill();
    }
    bool has(unsigned port, unsigned bytes) const {
        return aggregate.has(bytes) && (!(group_mask >> port & 1) || group.has(bytes));
    }
    void take(unsigned port, unsigned bytes) {
        aggregate.take(bytes);
        if (group_mask >> port & 1) group.take(bytes);
    }
    void give_back(unsigned port, unsigned bytes) {
        aggregate.give_back(bytes);
        if (group_mask >> port & 1) group.give_back(bytes);
    }
};

// What the master drives on the five channels during one cycle.
struct AxiMasterOut {
    bool arvalid = false;
    uint64_t araddr = 0;
    unsigned arlen = 0, arsize = 0, arburst = 0, arid = 0;
    bool rready = false;
    bool awvalid = false;
    uint64_t awaddr = 0;
    unsigned awlen = 0, awsize = 0, awburst = 0, awid = 0;
    bool wvalid = false;
    uint8_t wdata[64] = {};
    uint64_t wstrb = 0;
    bool wlast = false;
    bool bready = false;
};

// What the slave drives.
struct AxiSlaveOut {
    bool arready = false;
    bool rvalid = false;
    uint8_t rdata[64] = {};
    unsigned rresp = 0, rid = 0;
    bool rlast = false;
    bool awready = false;
    bool wready = false;
    bool bvalid = false;
    unsigned bresp = 0, bid = 0;
};

// Counters, in the order of STAT_NAMES.
enum Stat : unsigned {
    CYCLES,
    DDR_READ_BYTES,
    DDR_WRITE_BYTES,
    READ_BURSTS,
    WRITE_BURSTS,
    R_BEAT_CYCLES,
    W_BEAT_CYCLES,
    AR_STALL_CYCLES,
    AW_STALL_CYCLES,
    R_BACKPRESSURE_CYCLES,
    READ_BUSY_CYCLES,
    WRITE_BUSY_CYCLES,
    MAX_READS_IN_FLIGHT,
    MAX_WRITES_IN_FLIGHT,
    READ_ERRORS,
    WRITE_ERRORS,
    PROTOCOL_ERRORS,
    FAULT_READ_ERRORS,
    FAULT_WRITE_ERRORS,
    FAULT_HUNG_READS,
    FAULT_DELAY_CYCLES,
    FAULT_AR_STALLS,
    FAULT_AW_STALLS,
    FAULT_W_STALLS,
    FAULT_R_GAPS,
    FAULT_B_GAPS,
    N_STATS
};

// Comma-separated, in Stat order; Python builds its dict from this string.
static const char STAT_NAMES[] =
    "cycles,ddr_read_bytes,ddr_write_bytes,read_bursts,write_bursts,r_beat_cycles,"
    "w_beat_cycles,ar_stall_cycles,aw_stall_cycles,r_backpressure_cycles,read_busy_cycles,"
    "write_busy_cycles,max_reads_in_flight,max_writes_in_flight,read_errors,write_errors,"
    "protocol_errors,fault_read_errors,fault_write_errors,fault_hung_reads,fault_delay_cycles,"
    "fault_ar_stalls,fault_aw_stalls,fault_w_stalls,fault_r_gaps,fault_b_gaps";

enum AxiBurst : unsigned { FIXED = 0, INCR = 1, WRAP = 2 };
// The faults that fire once, in the order of DdrShared::fired_at.
enum FaultEvent : unsigned { READ_ERROR_EVENT, WRITE_ERROR_EVENT, HUNG_READ_EVENT };
enum AxiResp : unsigned { OKAY = 0, SLVERR = 2, DECERR = 3 };

// One AXI4 slave port onto the shared memory.
class DdrPort {
  public:
    DdrPort(std::vector<uint8_t> &memory, DdrShared &shared, unsigned index, unsigned bus_bytes,
            DdrTiming timing)
        : memory_(&memory), shared_(&shared), index_(index), bus_bytes_(bus_bytes),
          timing_(timing) {
        timing_.read_latency = std::max(1u, timing_.read_latency);
        timing_.write_latency = std::max(1u, timing_.write_latency);
        timing_.max_outstanding = std::max(1u, timing_.max_outstanding);
        reset();
    }

    const AxiSlaveOut &out() const { return out_; }
    uint64_t stat(unsigned i) const { return stats_[i]; }
    bool hang_reads = false;

    // A new fault plan starts: each port draws from its own stream of the seed.
    void reseed(uint64_t seed) {
        rng_.state = seed;
        rng_.state = rng_.next() ^ (0xD1B54A32D192ED03ull * (index_ + 1));
    }

    // No burst in flight and no response owed.
    bool idle() const { return reads_.empty() && writes_.empty() && responses_.empty(); }

    // Drops every transaction in flight (the accelerator is being reset); memory is kept.
    void reset() {
        reads_.clear();
        writes_.clear();
        responses_.clear();
        out_ = AxiSlaveOut{};
        r_bucket_.configure(timing_.bytes_per_cycle, bus_bytes_);
        w_bucket_.configure(timing_.bytes_per_cycle, bus_bytes_);
        reads_in_flight_ = writes_in_flight_ = 0;
        r_taken_ = b_taken_ = write_first_ = false;
        ar_withheld_ = aw_withheld_ = w_withheld_ = false;
        prepare(0);
    }

    // Ends cycle `now`: the master drove `m` while the slave drove `out()`. The outputs for
    // the next cycle follow from prepare(), once every port has ended its cycle.
    void clock(const AxiMasterOut &m, uint64_t now) {
        const bool ar_hs = m.arvalid && out_.arready;
        const bool r_hs = out_.rvalid && m.rready;
        const bool aw_hs = m.awvalid && out_.awready;
        const bool w_hs = m.wvalid && out_.wready;
        const bool b_hs = out_.bvalid && m.bready;

        stats_[CYCLES]++;
        stats_[AR_STALL_CYCLES] += m.arvalid && !out_.arready;
        stats_[AW_STALL_CYCLES] += m.awvalid && !out_.awready;
        stats_[R_BACKPRESSURE_CYCLES] += out_.rvalid && !m.rready;
        stats_[READ_BUSY_CYCLES] += reads_in_flight_ > 0;
        stats_[WRITE_BUSY_CYCLES] += writes_in_flight_ > 0;
        // Injected back-pressure is counted only where a master was kept waiting by it.
        stats_[FAULT_AR_STALLS] += m.arvalid && ar_withheld_;
        stats_[FAULT_AW_STALLS] += m.awvalid && aw_withheld_;
        stats_[FAULT_W_STALLS] += m.wvalid && w_withheld_;

        if (ar_hs) {
            const unsigned extra = rng_.upto(shared_->faults.read_jitter);
            stats_[FAULT_DELAY_CYCLES] += extra;
            reads_.push_back(Burst{m.araddr, m.arlen, m.arsize, m.arburst, m.arid,
                                   now + timing_.read_latency + extra});
            if (shared_->read_bursts++ == shared_->faults.hang_read_burst) {
                reads_.back().hung = true;
                stats_[FAULT_HUNG_READS]++;
                shared_->fired_at[HUNG_READ_EVENT] = now;
            }
            check_burst(reads_.back());
            reads_in_flight_++;
            stats_[READ_BURSTS]++;
            stats_[MAX_READS_IN_FLIGHT] =
                std::max<uint64_t>(stats_[MAX_READS_IN_FLIGHT], reads_in_flight_);
        }
        if (r_hs) {
            stats_[R_BEAT_CYCLES]++;
            stats_[DDR_READ_BYTES] += reads_.front().beat_bytes();
            if (out_.rlast) {
                reads_.pop_front();
                reads_in_flight_--;
            }
        }
        if (aw_hs) {
            writes_.push_back(Burst{m.awaddr, m.awlen, m.awsize, m.awburst, m.awid, 0});
            check_burst(writes_.back());
            writes_in_flight_++;
            stats_[WRITE_BURSTS]++;
            stats_[MAX_WRITES_IN_FLIGHT] =
                std::max<uint64_t>(stats_[MAX_WRITES_IN_FLIGHT], writes_in_flight_);
        }
        if (w_hs) {
            write_beat(m, now);
        } else if (out_.wready) {
            // The beat offered was not taken: the bandwidth it reserved is not spent.
            w_bucket_.give_back(writes_.front().beat_bytes());
            shared_->give_back(index_, writes_.front().beat_bytes());
        }
        if (b_hs) {
            responses_.pop_front();
            writes_in_flight_--;
        }
        r_taken_ = r_hs;
        b_taken_ = b_hs;
    }

    // Slave outputs for cycle `next`; the shared buckets have been refilled for it.
    void prepare(uint64_t next) {
        r_bucket_.refill();
        w_bucket_.refill();
        const DdrFaults &f = shared_->faults;
        out_.arready = reads_in_flight_ < timing_.max_outstanding;
        out_.awready = writes_in_flight_ < timing_.max_outstanding;
        ar_withheld_ = out_.arready && rng_.chance(f.ar_stall);
        aw_withheld_ = out_.awready && rng_.chance(f.aw_stall);
        out_.arready = out_.arready && !ar_withheld_;
        out_.awready = out_.awready && !aw_withheld_;

        // Reads and writes take turns at the bandwidth they share, so neither starves. An
        // idle port forgets whose turn it was (as its buckets fill up to their caps), so a
        // run's timing does not depend on what ran before it.
        write_first_ = idle() ? true : !write_first_;
        if (write_first_) offer_write();
        present_next_read(next);
        if (!write_first_) offer_write();

        if (b_taken_) out_.bvalid = false;
        if (!out_.bvalid && !responses_.empty() && responses_.front().ready_at <= next) {
            if (rng_.chance(f.b_gap)) {
                stats_[FAULT_B_GAPS]++;
            } else {
                out_.bvalid = true;
                out_.bresp = responses_.front().resp;
                out_.bid = responses_.front().id;
                if (responses_.front().injected) shared_->fired_at[WRITE_ERROR_EVENT] = next;
            }
        }
        r_taken_ = b_taken_ = false;
    }

  private:
    struct Burst {
        uint64_t addr;
        unsigned len, size, burst, id;
        uint64_t ready_at;  // reads: first cycle an R beat may be presented
        unsigned beat = 0;  // next beat to present (R) or to receive (W)
        bool error = false;
        bool hung = false;  // a read never answered (DdrFaults::hang_read_burst)
        unsigned beat_bytes() const { return 1u << size; }
        // Address of beat `i`, per the AXI4 burst rules.
        uint64_t beat_addr(unsigned i) const {
            const uint64_t n = beat_bytes();
            const uint64_t aligned = addr & ~(n - 1);
            if (burst == FIXED || i == 0) return addr;
            if (burst == WRAP) {
                const uint64_t span = n * (len + 1);
                const uint64_t base = addr & ~(span - 1);
                return base + ((aligned - base + i * n) % span);
            }
            return aligned + i * n;
        }
    };
    struct Response {
        uint64_t ready_at;
        unsigned resp, id;
        bool injected;  // resp is DdrFaults::error_resp, injected
    };

    void check_burst(Burst &b) {
        const uint64_t n = b.beat_bytes();
        // A master must not cross a 4 KiB boundary in one INCR burst, nor use a beat wider
        // than the bus: counted so a test can assert the DMA never does.
        if (n > bus_bytes_) stats_[PROTOCOL_ERRORS]++;
        if (b.burst == INCR) {
            const uint64_t first = b.addr & ~(n - 1);
            const uint64_t last = first + n * (b.len + 1) - 1;
            if ((b.addr >> 12) != (last >> 12)) stats_[PROTOCOL_ERRORS]++;
        }
        if (b.burst == WRAP && b.len != 1 && b.len != 3 && b.len != 7 && b.len != 15)
            stats_[PROTOCOL_ERRORS]++;
        if (b.burst > WRAP) stats_[PROTOCOL_ERRORS]++;
    }

    // The bus lanes a beat at `beat_addr` occupies: [lo, hi).
    void lanes(const Burst &b, uint64_t beat_addr, unsigned &lo, unsigned &hi) const {
        const uint64_t n = b.beat_bytes();
        lo = static_cast<unsigned>(beat_addr % bus_bytes_);
        hi = static_cast<unsigned>((beat_addr & ~(n - 1)) % bus_bytes_ + n);
        hi = std::min(hi, bus_bytes_);
    }

    bool in_range(uint64_t address, uint64_t length) const {
        return address <= memory_->size() && length <= memory_->size() - address;
    }

    void write_beat(const AxiMasterOut &m, uint64_t now) {
        Burst &b = writes_.front();
        const uint64_t beat_addr = b.beat_addr(b.beat);
        const uint64_t bus_base = beat_addr & ~static_cast<uint64_t>(bus_bytes_ - 1);
        unsigned lo, hi;
        lanes(b, beat_addr, lo, hi);
        // The whole beat is checked, so a write is all-or-nothing per beat.
        if (!in_range(bus_base + lo, hi - lo)) {
            b.error = true;
        } else {
            for (unsigned lane = lo; lane < hi; lane++) {
                if (m.wstrb >> lane & 1) {
                    (*memory_)[bus_base + lane] = m.wdata[lane];
                    stats_[DDR_WRITE_BYTES]++;
                }
            }
        }
        stats_[W_BEAT_CYCLES]++;
        const bool last = b.beat == b.len;
        if (m.wlast != last) stats_[PROTOCOL_ERRORS]++;
        b.beat++;
        if (last) {
            // The beats are in memory whatever the response says: an injected error tests
            // the master's reporting, not what a failed write leaves behind.
            const DdrFaults &f = shared_->faults;
            const bool injected = shared_->write_responses++ == f.write_error_response;
            const unsigned resp = b.error ? SLVERR : injected ? f.error_resp : OKAY;
            stats_[WRITE_ERRORS] += resp != OKAY;
            stats_[FAULT_WRITE_ERRORS] += injected;
            const unsigned extra = rng_.upto(f.write_jitter);
            stats_[FAULT_DELAY_CYCLES] += extra;
            responses_.push_back(
                Response{now + timing_.write_latency + extra, resp, b.id, injected});
            writes_.pop_front();
        }
    }

    // rvalid, once high, holds with its data until the handshake (AXI rule); a beat pays
    // its bandwidth when presented.
    void present_next_read(uint64_t next) {
        if (r_taken_) out_.rvalid = false;
        if (out_.rvalid || hang_reads) return;
        Burst *head = nullptr;  // the first burst with beats not yet presented
        for (Burst &b : reads_) {
            if (b.beat <= b.len) {
                head = &b;
                break;
            }
        }
        if (!head || head->hung || head->ready_at > next) return;
        const unsigned bytes = head->beat_bytes();
        if (!r_bucket_.has(bytes) || !shared_->has(index_, bytes)) return;
        if (rng_.chance(shared_->faults.r_gap)) {
            stats_[FAULT_R_GAPS]++;
            return;
        }
        present_read(*head, next);
        r_bucket_.take(bytes);
        shared_->take(index_, bytes);
    }

    // wready is offered when the next beat's bandwidth is there, which it reserves; clock()
    // gives it back if the beat is not taken.
    void offer_write() {
        out_.wready = false;
        w_withheld_ = false;
        if (writes_.empty()) return;
        const unsigned bytes = writes_.front().beat_bytes();
        if (!w_bucket_.has(bytes) || !shared_->has(index_, bytes)) return;
        if (rng_.chance(shared_->faults.w_stall)) {
            w_withheld_ = true;  // no bandwidth reserved: the beat cannot be taken
            return;
        }
        out_.wready = true;
        w_bucket_.take(bytes);
        shared_->take(index_, bytes);
    }

    void present_read(Burst &b, uint64_t next) {
        const uint64_t beat_addr = b.beat_addr(b.beat);
        const uint64_t bus_base = beat_addr & ~static_cast<uint64_t>(bus_bytes_ - 1);
        unsigned lo, hi;
        lanes(b, beat_addr, lo, hi);
        std::memset(out_.rdata, 0, sizeof out_.rdata);
        const bool ok = in_range(bus_base + lo, hi - lo);
        // An injected error beat carries zeros, as an out-of-range one does: data that come
        // with an error response are not to be used, so the master must not rely on them.
        const DdrFaults &f = shared_->faults;
        const bool injected = shared_->read_beats++ == f.read_error_beat;
        if (ok && !injected) std::memcpy(out_.rdata + lo, memory_->data() + bus_base + lo, hi - lo);
        const unsigned resp = !ok ? SLVERR : injected ? f.error_resp : OKAY;
        stats_[READ_ERRORS] += resp != OKAY;
        stats_[FAULT_READ_ERRORS] += injected;
        if (injected) shared_->fired_at[READ_ERROR_EVENT] = next;
        out_.rvalid = true;
        out_.rresp = resp;
        out_.rid = b.id;
        out_.rlast = b.beat == b.len;
        b.beat++;
    }

  private:
    std::vector<uint8_t> *memory_;
    DdrShared *shared_;
    unsigned index_;
    unsigned bus_bytes_;
    DdrTiming timing_;
    std::deque<Burst> reads_;      // accepted, not yet fully returned
    std::deque<Burst> writes_;     // accepted, data not yet complete
    std::deque<Response> responses_;
    unsigned reads_in_flight_ = 0, writes_in_flight_ = 0;
    Bucket r_bucket_, w_bucket_;
    bool r_taken_ = false, b_taken_ = false;  // this cycle's R beat / B was accepted
    bool write_first_ = false;                 // W is offered bandwidth before R this cycle
    // This cycle's ready was withheld by an injected fault (it would have been high).
    bool ar_withheld_ = false, aw_withheld_ = false, w_withheld_ = false;
    FaultRng rng_;
    AxiSlaveOut out_;
    uint64_t stats_[N_STATS] = {};
};

// The memory and its ports: what the SoC loop clocks.
class DdrSystem {
  public:
    // `group_mask`: the ports that share the group cap; rates in bytes per cycle, 0 = no cap.
    DdrSystem(uint64_t size, unsigned n_ports, unsigned bus_bytes, DdrTiming timing,
              double aggregate_bytes_per_cycle, double group_bytes_per_cycle,
              unsigned group_mask)
        : memory_(size, 0) {
        // Ports point at memory_ and shared_: the system is built in place, never moved.
        shared_.aggregate.configure(aggregate_bytes_per_cycle, bus_bytes);
        shared_.group.configure(group_bytes_per_cycle, bus_bytes);
        shared_.group_mask = group_mask;
        ports_.reserve(n_ports);
        for (unsigned p = 0; p < n_ports; p++)
            ports_.emplace_back(memory_, shared_, p, bus_bytes, timing);
    }

    DdrSystem(const DdrSystem &) = delete;
    DdrSystem &operator=(const DdrSystem &) = delete;

    uint64_t size() const { return memory_.size(); }
    uint8_t *data() { return memory_.data(); }
    unsigned n_ports() const { return static_cast<unsigned>(ports_.size()); }
    DdrPort &port(unsigned p) { return ports_[p]; }
    const DdrPort &port(unsigned p) const { return ports_[p]; }

    void set_hang_reads(bool hang) {
        for (DdrPort &port : ports_) port.hang_reads = hang;
    }
    bool hang_reads() const { return ports_[0].hang_reads; }
    uint64_t fault_fired_at(unsigned event) const { return shared_.fired_at[event]; }

    // Replaces the fault plan: the generators restart from the seed and the k-th beat,
    // response and burst are counted from now.
    void set_faults(const DdrFaults &faults) {
        shared_.faults = faults;
        shared_.read_beats = shared_.write_responses = shared_.read_bursts = 0;
        std::fill(std::begin(shared_.fired_at), std::end(shared_.fired_at), UINT64_MAX);
        for (DdrPort &port : ports_) port.reseed(faults.seed);
    }

    void reset() {
        shared_.aggregate.tokens = shared_.group.tokens = 0.0;
        first_ = 0;
        for (DdrPort &port : ports_) port.reset();
    }

    // Ends cycle `now` on every port (masters[p] is what port p's master drove), then
    // computes every port's outputs for the next cycle, the first port served rotating.
    void clock(const AxiMasterOut *masters, uint64_t now) {
        const unsigned n = n_ports();
        for (unsigned p = 0; p < n; p++) ports_[p].clock(masters[p], now);
        shared_.refill();
        for (unsigned i = 0; i < n; i++) ports_[(first_ + i) % n].prepare(now + 1);
        bool all_idle = true;
        for (const DdrPort &port : ports_) all_idle = all_idle && port.idle();
        // Idle ports forget the rotation too: the next run starts from the same state.
        first_ = all_idle ? 0 : (first_ + 1) % n;
    }

  private:
    std::vector<uint8_t> memory_;
    DdrShared shared_;
    std::vector<DdrPort> ports_;
    unsigned first_ = 0;
};

}  // namespace m3vit
