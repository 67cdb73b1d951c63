"""The phases of a compiled program: which part of an image each instruction belongs to.

Shared by the profile of a measured run (:mod:`m3vit.sw.runtime.profile`) and the cycle
estimate (:mod:`m3vit.sw.compiler.estimate`), so both sum cycles under the same names.
"""

from __future__ import annotations

from m3vit.hw.isa import INSTRUCTION_BYTES, Opcode, WeightSource, decode

__all__ = ["PHASES", "decode_all", "expert_bodies", "instruction_phases"]

#: The phases of an image, in program order.
PHASES = ("patch embedding", "attention", "dense MLP", "router", "experts", "combine",
          "head")


def decode_all(program: bytes) -> list:
    """Every instruction of a program, decoded: (opcode, fields) in order."""
    return [decode(program[i:i + INSTRUCTION_BYTES])
            for i in range(0, len(program) - INSTRUCTION_BYTES + 1, INSTRUCTION_BYTES)]


def expert_bodies(program: bytes) -> list[tuple[int, int]]:
    """The first and last pc of every ``EXPERTS`` loop body of a program, in order."""
    return [(pc + 1, pc + fields["body"]) for pc, (op, fields) in enumerate(decode_all(program))
            if op == Opcode.EXPERTS]


def instruction_phases(program: bytes) -> list[str]:
    """The phase (:data:`PHASES`) of every instruction of a compiled program.

    The compiler lays a block out as LayerNorm … residual add twice: attention (its
    softmax and buffer-weight GEMMs give it away), then the dense MLP, or the MoE layer —
    its gate GEMM, tables and ``ROUTE`` (router), the ``EXPERTS`` loop and its body
    (experts), ``COMBINE`` and the residual add (combine). A residual add is a
    ``RESIDUAL`` or fused into the ``GEMM`` or ``COMBINE`` before it (``residual`` set).
    What precedes the first LayerNorm is the patch embedding, what follows the last
    residual add is the head.
    """
    ops = decode_all(program)
    phases = ["head"] * len(ops)
    norms = [i for i, (op, _) in enumerate(ops) if op == Opcode.LAYERNORM]
    first = norms[0] if norms else len(ops)
    phases[:first] = ["patch embedding"] * first

    def adds(op: Opcode, fields: dict) -> bool:
        return op == Opcode.RESIDUAL or (op in (Opcode.GEMM, Opcode.COMBINE)
                                         and bool(fields.get("residual")))

    for start in norms:
        end = next((i for i in range(start, len(ops)) if adds(*ops[i])), None)
        if end is None:
            continue                                   # the final LayerNorm: the head
        segment = ops[start:end + 1]
        attention = any(op == Opcode.SOFTMAX or (op == Opcode.GEMM
                                                 and f["wsrc"] != WeightSource.DDR.value)
                        for op, f in segment)
        moe = any(op == Opcode.EXPERTS for op, _ in segment)
        if attention:
            phases[start:end + 1] = ["attention"] * len(segment)
        elif not moe:
            phases[start:end + 1] = ["dense MLP"] * len(segment)
        else:
            loop = next(i for i in range(start, end + 1) if ops[i][0] == Opcode.EXPERTS)
            body_end = loop + ops[loop][1]["body"]
            for i in range(start, end + 1):
                phases[i] = ("router" if i < loop else "experts" if i <= body_end
                             else "combine")
    return phases
