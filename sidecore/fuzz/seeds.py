#!/usr/bin/env python3
"""Writes the hand-made seed inputs of the fuzz targets into corpus/<target>/.

The `dispatch` seeds follow the input format described at the top of
harness_dispatch.rs; the `daemon_request` seeds are control messages as a VMM
writes them on the daemon's socket. Run from anywhere:

    python3 sidecore/fuzz/seeds.py

Files the fuzzer added to the corpus (named by their SHA-1) are left alone.
"""

import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))

# ---------------------------------------------------------------- dispatch

OPS = [1, 2, 3, 0x100, 0x1FF, 0x101, 0, 0x200]
NULL, CPUID, PTE, HC_ECHO, HC_DENIED, HC_UNKNOWN = 1, 2, 3, 0x100, 0x1FF, 0x101
GUEST_FLUSH, EXIT_PATH, ZAP, AMD = 0, 2, 3, 4


def u16(x):
    return struct.pack("<H", x)


def u32(x):
    return struct.pack("<I", x)


def u64(x):
    return struct.pack("<Q", x & (2**64 - 1))


def head(op, no_reply=False):
    """A structured head of a listed opcode."""
    return bytes([OPS.index(op) | (0x10 if no_reply else 0)])


def head_raw(word):
    return bytes([0x80]) + u64(word)


def head_op(opcode, flag_bit=None, high=None):
    """Any opcode (u16), optionally one flag bit and a high half."""
    s = 0x08
    tail = u16(opcode)
    if flag_bit is not None:
        s |= 0x30
        tail += bytes([flag_bit])
    if high is not None:
        s |= 0x40
        tail += u32(high)
    return bytes([s]) + tail


def w0():
    return b"\x00"


def wsmall(b):
    return bytes([1, b])


def wraw(x):
    return bytes([2]) + u64(x)


def wtable(page, misaligned=False):
    """GPA of pool page `page` (-2..=18); misaligned: 8 bytes in."""
    p = page + 2
    assert 0 <= p < 21
    if misaligned:
        # A byte >= 0xf0 adds 8; the page is still the byte % 21.
        p = 0xF0 + (p - 0xF0 % 21) % 21
        assert p <= 0xFF, "no misaligned form of that page"
    return bytes([3, p])


# pte_word targets and flags
POOL, FREE, IMAGE, SHARED, LOW, RAMEND, HIGH = range(7)
RW, US, A, D, NX, PS = 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5, 1 << 6
NOT_PRESENT = 1


def wpte(region, page=0, flags=0, extra_bit=None):
    t = (page << 3) | region
    f = flags | (0x80 if extra_bit is not None else 0)
    return bytes([4, t, f]) + (bytes([extra_bit]) if extra_bit is not None else b"")


def windex(i):
    return bytes([5]) + u16(i)


def wu32(x):
    return bytes([6]) + u32(x)


LEAVES = [0, 1, 4, 0xB, 0xD, 0xE, 0x1F, 0x4000_0000, 0x4000_0001, 0x4000_0105, 0x8000_0000, 0x8000_0008,
          0x8000_0009, 0xC000_0000, 0xC000_0001, 0xFFFF_FFFF]


def wleaf(leaf):
    return bytes([7, LEAVES.index(leaf)])


def words(*ws):
    ws = list(ws) + [w0()] * (6 - len(ws))
    assert len(ws) == 6
    return b"".join(ws)


def direct(h, ws, vcpu=b"\x00"):
    return b"\x00" + vcpu + h + ws


def post(h, ws, delta=0, state=0):
    return bytes([2, delta & 0xFF, state]) + h + ws


def raw_slot(slot, state, h, ws):
    return bytes([3, slot]) + u64(state) + h + ws


SERVE = b"\x04"


def burst(reqs):
    assert 1 <= len(reqs) <= 40
    return bytes([6, len(reqs) - 1]) + b"".join(h + ws for h, ws in reqs)


def switches(paused=False, timed=False):
    return bytes([7, (1 if paused else 0) | (2 if timed else 0)])


def pte(table, index, entry):
    return head(PTE), words(table, index, entry)


def dispatch_seeds():
    s = {}
    s["null"] = bytes([GUEST_FLUSH]) + direct(head(NULL), words(wsmall(42))) + direct(
        head(NULL, no_reply=True), words(wraw(2**64 - 1), wraw(5)))
    s["cpuid_intel"] = bytes([GUEST_FLUSH]) + b"".join(
        direct(head(CPUID), words(wleaf(leaf), sub))
        for leaf, sub in [(0, w0()), (1, wsmall(55)), (4, wsmall(1)), (0xB, wsmall(5)), (0xE, wsmall(1)),
                          (0x4000_0105, w0()), (0x8000_0009, w0()), (0xC000_0001, wsmall(1)),
                          (0xFFFF_FFFF, wu32(0xFFFF_FFFF))])
    s["cpuid_amd"] = bytes([AMD]) + b"".join(
        direct(head(CPUID), words(wleaf(leaf), w0())) for leaf in [0, 0xE, 0x8000_0009, 0x4000_0001])
    s["cpuid_bad_args_and_vcpus"] = bytes([GUEST_FLUSH]) + direct(head(CPUID), words(wraw(1 << 32))) + direct(
        head(CPUID), words(w0(), wraw(2**64 - 1))) + direct(head(CPUID), words(w0()), vcpu=b"\xe3") + direct(
        head(CPUID), words(w0()), vcpu=b"\xff" + u32(0xFFFF_FFFF))
    s["registry"] = bytes([GUEST_FLUSH]) + direct(head(HC_ECHO), words(wraw(0xDEAD_BEEF))) + direct(
        head(HC_DENIED), words()) + direct(head(HC_UNKNOWN), words()) + direct(head(0x200), words()) + direct(
        head(0), words()) + direct(head_op(0xFFFF), words()) + direct(head_op(0xFF), words())
    s["reserved_head_bits"] = bytes([GUEST_FLUSH]) + direct(head_raw(1 | (1 << 40)), words()) + direct(
        head_op(1, flag_bit=15), words()) + direct(head_op(1, flag_bit=1), words()) + direct(
        head_op(1, high=1), words()) + direct(head_raw(2**64 - 1), words(wraw(2**64 - 1)))
    s["pte_leaf_map_change_unmap"] = bytes([GUEST_FLUSH]) + b"".join(
        direct(*pte(wtable(3), windex(5), e)) for e in
        [wpte(FREE, 0, RW), wpte(FREE, 1), w0(), w0(), wpte(IMAGE, 1), wpte(POOL, 0)])
    s["pte_non_leaf_levels"] = bytes([GUEST_FLUSH]) + b"".join(direct(*pte(t, i, e)) for t, i, e in [
        (wtable(2), windex(1), wpte(POOL, 5, RW)),
        (wtable(2), windex(2), wpte(POOL, 5, RW)),
        (wtable(1), windex(3), wpte(POOL, 5)),
        (wtable(2), windex(4), wpte(FREE, 0)),
        (wtable(0), windex(1), wpte(POOL, 0)),
        (wtable(5), windex(9), wpte(FREE, 2)),
        (wtable(0), windex(511), wpte(POOL, 6, RW | D)),
        (wtable(6), windex(0), wpte(POOL, 7, RW)),
        (wtable(7), windex(0), wpte(POOL, 8, RW)),
        (wtable(8), windex(0), wpte(FREE, 3, RW | NX)),
    ])
    s["pte_denied_targets"] = bytes([GUEST_FLUSH]) + b"".join(
        direct(*pte(wtable(3), windex(7), e)) for e in
        [wpte(LOW, 1), wpte(LOW, 16), wpte(SHARED, 0), wpte(SHARED, 1), wpte(RAMEND, 2), wpte(HIGH, 0),
         wpte(POOL, 0, RW), wpte(IMAGE, 16)])
    s["pte_reserved_bits"] = bytes([GUEST_FLUSH]) + b"".join(
        direct(*pte(wtable(3), windex(1), e)) for e in
        [wpte(FREE, 0, PS), wpte(FREE, 0, 0, extra_bit=8), wpte(FREE, 0, 0, extra_bit=52),
         wpte(FREE, 0, 0, extra_bit=62), wpte(FREE, 0, NOT_PRESENT), wpte(POOL, 5, PS)])
    s["pte_bad_tables"] = bytes([GUEST_FLUSH]) + b"".join(direct(*pte(t, i, wpte(FREE))) for t, i in [
        (wraw(0x60_0000), w0()), (wtable(0, misaligned=True), w0()), (wtable(9), w0()), (wtable(16), w0()),
        (wtable(-1), w0()), (wtable(3), windex(512)), (wtable(3), wraw(2**64 - 1))])
    s["pte_exit_path"] = bytes([EXIT_PATH]) + b"".join(
        direct(*pte(wtable(3), windex(5), e)) for e in [wpte(FREE, 0), wpte(FREE, 1), w0()]) + direct(
        *pte(wtable(2), windex(1), wpte(POOL, 5))) + direct(*pte(wtable(2), windex(1), wpte(POOL, 6)))
    s["pte_zap"] = bytes([ZAP]) + b"".join(
        direct(*pte(wtable(3), windex(5), e)) for e in [wpte(FREE, 0), wpte(FREE, 1), w0(), w0()])
    s["ring_post_serve"] = bytes([GUEST_FLUSH]) + post(head(NULL), words(wsmall(99))) + SERVE
    s["ring_every_op"] = bytes([GUEST_FLUSH]) + burst([
        (head(NULL), words(wsmall(1))),
        (head(CPUID), words(wleaf(4), wsmall(1))),
        pte(wtable(3), windex(0), wpte(FREE, 4, RW)),
        (head(HC_ECHO), words(wraw(77))),
        (head(HC_DENIED), words()),
        (head(HC_UNKNOWN), words()),
        (head_raw(1 << 33), words()),
    ]) + SERVE
    s["ring_bad_sequence"] = bytes([GUEST_FLUSH]) + post(head(NULL), words(wsmall(1)), delta=64) + SERVE + post(
        head(NULL), words(wsmall(2))) + SERVE + post(head(NULL), words(), delta=-1) + SERVE
    s["ring_cancelled"] = bytes([GUEST_FLUSH]) + post(head(NULL), words(), state=0x84) + post(
        head(NULL), words(wsmall(3)), delta=1) + SERVE
    s["ring_burst_over_sweep"] = bytes([GUEST_FLUSH]) + burst([(head(NULL), words(wsmall(i))) for i in range(40)]) \
        + SERVE + SERVE
    s["ring_junk_states"] = bytes([GUEST_FLUSH]) + raw_slot(0, 0x2, head(NULL), words()) + SERVE + raw_slot(
        0, 0xF, head(NULL), words()) + SERVE + raw_slot(0, 0x3, head(NULL), words()) + SERVE + raw_slot(
        0, 2**64 - 1 - 0xE, head(NULL), words()) + SERVE + raw_slot(0, 0x1, head(NULL), words()) + SERVE
    s["ring_paused_timed"] = bytes([GUEST_FLUSH]) + switches(paused=True) + post(head(NULL), words()) + SERVE + \
        switches(timed=True) + SERVE + post(head(CPUID), words(), delta=0) + SERVE
    s["ring_pte_tree"] = bytes([ZAP]) + burst([
        pte(wtable(2), windex(3), wpte(POOL, 9, RW)),
        pte(wtable(9), windex(0), wpte(FREE, 1, RW)),
        pte(wtable(9), windex(0), wpte(FREE, 2, RW)),
        pte(wtable(9), windex(0), w0()),
        pte(wtable(1), windex(0), wpte(POOL, 9)),
    ]) + SERVE
    s["mixed_direct_and_ring"] = bytes([GUEST_FLUSH]) + direct(*pte(wtable(3), windex(8), wpte(FREE, 0))) + post(
        *pte(wtable(3), windex(8), wpte(FREE, 9))) + SERVE + direct(*pte(wtable(3), windex(8), w0()))
    s["config_only"] = bytes([AMD | ZAP])
    return s


# ---------------------------------------------------------------- daemon_request

MAX_VCPUS = 24


def region_size(vcpus):
    return 4096 + vcpus * 8192


def attach(**over):
    a = {
        "op": "attach",
        "vcpus": 1,
        "backend": "vmx",
        "ram_size": 64 << 20,
        "shared_gpa": 0x40_0000,
        "shared_size": 0x3000,
        "pool_gpa": 0x10_0000,
        "pool_size": 0x10_0000,
        "image_gpa": 0x20_0000,
        "image_end": 0x21_0000,
        "free_gpa": 0x60_0000,
        "cpuid": [[[0, 0, 0, 0xD, 0x756E_6547, 0x6C65_746E, 0x4965_6E69], [1, 0, 0, 0x906EA, 0x800, 0, 0]]],
    }
    a.update(over)
    if "vcpus" in over and "cpuid" not in over and isinstance(over["vcpus"], int) and 0 < over["vcpus"] <= 64:
        a["cpuid"] = [[[0, 0, 0, 1, 2, 3, 4]] for _ in range(over["vcpus"])]
    return a


def daemon_seeds():
    s = {}
    j = lambda v: json.dumps(v, separators=(",", ":")).encode()
    s["status"] = b'{"op":"status"}'
    s["pause"] = b'{"op":"pause"}'
    s["resume"] = b'{"op":"resume"}\n'
    s["attach_vmx"] = j(attach())
    s["attach_pvm"] = j(attach(backend="pvm"))
    s["attach_svm_2_vcpus"] = j(attach(backend="svm", vcpus=2, shared_size=region_size(2)))
    s["attach_max_vcpus"] = j(attach(vcpus=MAX_VCPUS, shared_size=region_size(MAX_VCPUS), shared_gpa=0x80_0000))
    s["attach_too_many_vcpus"] = j(attach(vcpus=MAX_VCPUS + 1, shared_size=region_size(MAX_VCPUS + 1)))
    s["attach_zero_vcpus"] = j(attach(vcpus=0, cpuid=[]))
    s["attach_cpuid_count_mismatch"] = j(attach(vcpus=2, cpuid=[[]], shared_size=region_size(2)))
    s["attach_overlap"] = j(attach(pool_gpa=0x40_0000))
    s["attach_misaligned_shared"] = j(attach(shared_gpa=0x40_0001))
    s["attach_shared_too_small"] = j(attach(shared_size=0x1000))
    s["attach_pool_not_pages"] = j(attach(pool_size=0x1001))
    s["attach_wrapping_ranges"] = j(attach(shared_gpa=2**64 - 4096, pool_gpa=2**64 - 0x1000, ram_size=2**64 - 1))
    s["attach_image_outside"] = j(attach(image_gpa=0x30_0000, image_end=0x20_0000, free_gpa=2**64 - 1))
    s["attach_tiny_ram"] = j(attach(ram_size=0, shared_gpa=0, pool_gpa=0, pool_size=0))
    s["attach_small_pool"] = j(attach(pool_size=0x4000, ram_size=0x70_0000))
    s["attach_unknown_field"] = j(dict(attach(), extra=1))
    missing = attach()
    del missing["free_gpa"]
    s["attach_missing_field"] = j(missing)
    s["attach_bad_cpuid_entry"] = j(attach(cpuid=[[[1, 2, 3]]]))
    s["attach_negative_and_float"] = b'{"op":"attach","vcpus":-1,"backend":"vmx","ram_size":1.5e9,"shared_gpa":0,' \
        b'"shared_size":0,"pool_gpa":0,"pool_size":0,"image_gpa":0,"image_end":0,"free_gpa":0,"cpuid":[]}'
    s["unknown_op"] = b'{"op":"nuke"}'
    s["status_extra_field"] = b'{"op":"status","x":1}'
    s["not_an_object"] = b"[]"
    s["truncated"] = j(attach())[:97]
    s["escapes_and_nesting"] = b'{"op":"att\\u0061ch","backend":"\\ud83d\\ude00\\n","vcpus":1,"cpuid":[[[[]]]]}'
    return s


def write(target, seeds):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        with open(os.path.join(d, "seed_" + name), "wb") as f:
            f.write(data)
    print(f"{target}: {len(seeds)} seeds in {d}")


if __name__ == "__main__":
    write("dispatch", dispatch_seeds())
    write("daemon_request", daemon_seeds())
