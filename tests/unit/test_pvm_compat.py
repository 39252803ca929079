"""Decoding the memory operand of LDMXCSR/STMXCSR for the kvm_pvm fixups."""
import pytest

from livemig.machine.pvm_compat import decode_mxcsr_insn

REGS = {n: 0x1000 * (i + 1) for i, n in enumerate(
    ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"))}
REGS["rip"] = 0xFFFFFFFF81000000
SEG = {"fs": 0x10000000, "gs": 0xFFFF888007800000}


@pytest.mark.parametrize("hexcode,want", [
    ("0fae542404", ("ldmxcsr", REGS["rsp"] + 4, 5)),            # Linux's ldmxcsr [rsp+4]
    ("0fae5df8", ("stmxcsr", REGS["rbp"] - 8, 4)),              # disp8 is signed
    ("0fae1510000000", ("ldmxcsr", REGS["rip"] + 7 + 0x10, 7)),  # RIP-relative
    ("410fae17", ("ldmxcsr", REGS["r15"], 4)),                   # REX.B
    ("0fae548808", ("ldmxcsr", REGS["rax"] + REGS["rcx"] * 4 + 8, 5)),  # SIB base+index*4+disp8
    ("650fae142500100000", ("ldmxcsr", SEG["gs"] + 0x1000, 9)),  # gs: and disp32 without base
    ("0fae9e04010000", ("stmxcsr", REGS["rsi"] + 0x104, 7)),     # disp32
])
def test_memory_operands(hexcode, want):
    assert decode_mxcsr_insn(bytes.fromhex(hexcode), REGS, SEG) == want


@pytest.mark.parametrize("hexcode", ["0faed0", "f30fae10", "0fae38", "0f0b", "0fae", "0fae54", "cc"])
def test_other_instructions_are_not_ours(hexcode):
    assert decode_mxcsr_insn(bytes.fromhex(hexcode), REGS, SEG) is None
