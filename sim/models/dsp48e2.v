// A subset model of the UltraScale+ DSP48E2 slice, for Verilator.
//
// Written from the DSP48E2 user guide (UG579), not from Xilinx's unisim model (which is not
// on this machine): it lets the cocotb bench of m3vit.hw.packed.PackedArray run the form
// that synthesis gets (one DSP48E2 instance per packed multiply-add, hw/target.py) against
// the same expected values as the plain form. It models only what that instance uses and
// stops the simulation on anything else:
//
//   A2 register (AREG 0/1, CEA2), B2 register (BREG 0/1, CEB2), D register (DREG 0/1, CED);
//   the pre-adder AD = D + A[26:0] (AMULTSEL "AD", PREADDINSEL "A", ADREG 0, INMODE 5'b00100)
//   or A[26:0] alone (AMULTSEL "A", INMODE 5'b00000); the signed 27 x 18 multiply into M
//   (MREG 0/1, CEM); the ALU with W = 0, X = Y = M or 0, Z = 0, PCIN or P, ALUMODE 0
//   (add), no carry in; P (PREG 0/1, CEP) and PCOUT = P. Resets are synchronous.
//
// What the bench therefore checks is the instance's wiring and our reading of UG579, not
// the silicon: a Vivado behavioural simulation with the unisim library would.
module DSP48E2 #(
    parameter integer AREG = 1,
    parameter integer ACASCREG = 1,
    parameter integer BREG = 1,
    parameter integer BCASCREG = 1,
    parameter integer DREG = 1,
    parameter integer ADREG = 1,
    parameter integer MREG = 1,
    parameter integer PREG = 1,
    parameter integer CREG = 1,
    parameter integer INMODEREG = 1,
    parameter integer OPMODEREG = 1,
    parameter integer ALUMODEREG = 1,
    parameter integer CARRYINREG = 1,
    parameter integer CARRYINSELREG = 1,
    parameter A_INPUT = "DIRECT",
    parameter B_INPUT = "DIRECT",
    parameter AMULTSEL = "A",
    parameter BMULTSEL = "B",
    parameter PREADDINSEL = "A",
    parameter USE_MULT = "MULTIPLY",
    parameter USE_SIMD = "ONE48"
) (
    input CLK,
    input [29:0] A,
    input [17:0] B,
    input [47:0] C,
    input [26:0] D,
    input [47:0] PCIN,
    input [29:0] ACIN,
    input [17:0] BCIN,
    input CARRYIN,
    input CARRYCASCIN,
    input MULTSIGNIN,
    input [4:0] INMODE,
    input [8:0] OPMODE,
    input [3:0] ALUMODE,
    input [2:0] CARRYINSEL,
    input CEA1, CEA2, CEB1, CEB2, CEC, CED, CEAD, CEM, CEP,
    input CEALUMODE, CECTRL, CECARRYIN, CEINMODE,
    input RSTA, RSTB, RSTC, RSTD, RSTM, RSTP,
    input RSTALLCARRYIN, RSTALUMODE, RSTCTRL, RSTINMODE,
    output [47:0] P,
    output [47:0] PCOUT
);
    initial begin
        if (AREG > 1 || BREG > 1 || DREG > 1 || MREG > 1 || PREG > 1 || ADREG != 0
                || ACASCREG != AREG || BCASCREG != BREG || INMODEREG != 0
                || OPMODEREG != 0 || ALUMODEREG != 0 || CARRYINREG != 0
                || CARRYINSELREG != 0 || A_INPUT != "DIRECT" || B_INPUT != "DIRECT"
                || (AMULTSEL != "A" && AMULTSEL != "AD") || BMULTSEL != "B"
                || PREADDINSEL != "A" || USE_MULT != "MULTIPLY" || USE_SIMD != "ONE48")
            $fatal(1, "DSP48E2 model: attributes outside the modelled subset");
    end

    reg [29:0] a2 = 0;
    reg [17:0] b2 = 0;
    reg [26:0] d1 = 0;
    reg [47:0] m1 = 0;
    reg [47:0] p1 = 0;

    wire [29:0] a_used = AREG == 1 ? a2 : A;
    wire [17:0] b_used = BREG == 1 ? b2 : B;
    wire [26:0] d_used = DREG == 1 ? d1 : D;
    wire [26:0] ad = d_used + a_used[26:0];  // the 27-bit pre-adder: D + A2
    wire [26:0] mult_a = AMULTSEL == "AD" ? ad : a_used[26:0];
    wire signed [44:0] product = $signed(mult_a) * $signed(b_used);
    wire [47:0] m_next = {{3{product[44]}}, product};
    wire [47:0] m_used = MREG == 1 ? m1 : m_next;
    wire [47:0] xy = OPMODE[3:0] == 4'b0101 ? m_used : 48'd0;
    wire [47:0] z = OPMODE[6:4] == 3'b001 ? PCIN : OPMODE[6:4] == 3'b010 ? p1 : 48'd0;
    wire [47:0] p_next = z + xy;

    assign P = PREG == 1 ? p1 : p_next;
    assign PCOUT = P;

    always @(posedge CLK) begin
        if (ALUMODE != 4'b0000 || CARRYINSEL != 3'b000 || CARRYIN != 1'b0
                || OPMODE[8:7] != 2'b00 || (OPMODE[3:0] != 4'b0101 && OPMODE[3:0] != 4'b0000)
                || (OPMODE[6:4] != 3'b000 && OPMODE[6:4] != 3'b001 && OPMODE[6:4] != 3'b010)
                || INMODE != (AMULTSEL == "AD" ? 5'b00100 : 5'b00000))
            $fatal(1, "DSP48E2 model: OPMODE/INMODE/ALUMODE outside the modelled subset");
        if (RSTA) a2 <= 0; else if (CEA2) a2 <= A;
        if (RSTB) b2 <= 0; else if (CEB2) b2 <= B;
        if (RSTD) d1 <= 0; else if (CED) d1 <= D;
        if (RSTM) m1 <= 0; else if (CEM) m1 <= m_next;
        if (RSTP) p1 <= 0; else if (CEP) p1 <= p_next;
    end
endmodule
