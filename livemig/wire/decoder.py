"""Sans-IO decoder of the main migration stream (the destination's view).

Usage: write received bytes into `space()` and `commit(n)` them (or `feed(data)`), then call
`next_event()` until it returns None. Page data in `Pages` events are views into the decoder's
buffer: consume them before the next `space()`/`feed()` call. Every rule of PROTOCOL.md §11 that
concerns the main stream is checked here; bad input raises ProtocolError and nothing else.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ..errors import ProtocolError
from . import ram as R
from .cursor import Cursor, Incomplete
from .stream import CMD_LEN, MAGIC, MAX_PACKAGED_SIZE, VERSION, VERSION_COMPAT, Cmd, Section
from .vmstate import VMStateDescription, decode as vmstate_decode

TPS = R.TARGET_PAGE_SIZE
_PAGE_MASK = TPS - 1
_BE64 = struct.Struct(">Q")
_BE_U64 = np.dtype(">u8")
_NEED_MORE = object()  # _ram_run: a record is cut at the end of the received bytes
_MIN_SPLIT = 16  # a contiguous start of a run this long is an event of its own
_STEPS = np.arange(1024, dtype=np.uint64) * np.uint64(TPS)  # offset steps of a contiguous run
_CP = R.FLAG_CONTINUE | R.FLAG_PAGE
_CZ = R.FLAG_CONTINUE | R.FLAG_ZERO
VMDESC_KEEP = 1 << 20  # bytes of vmdesc JSON kept; the rest is drained


# ----------------------------------------------------------------------------- events
@dataclass(frozen=True)
class Header:
    version: int


@dataclass(frozen=True)
class Configuration:
    machine: str


@dataclass(frozen=True)
class RamSetup:
    blocks: list[R.BlockInfo]


@dataclass(frozen=True)
class Pages:
    block: str
    offsets: np.ndarray  # uint64 byte offsets in the block
    data: np.ndarray  # (n, TPS) uint8 view into the decoder buffer
    contiguous: bool = False  # offsets[i] == offsets[0] + i * TPS (set by the decoder)


@dataclass(frozen=True)
class ZeroPages:
    block: str
    offsets: np.ndarray


@dataclass(frozen=True)
class MultifdFlush:
    """RAM_SAVE_FLAG_MULTIFD_FLUSH: every multifd channel must be drained up to its sync here."""


@dataclass(frozen=True)
class SectionEnd:
    """A RAM chunk ended (EOS + footer). `kind` is the section type that opened it."""

    section_id: int
    kind: Section


@dataclass(frozen=True)
class DeviceState:
    idstr: str
    instance_id: int
    version_id: int
    values: dict


@dataclass(frozen=True)
class OpenReturnPath:
    pass


@dataclass(frozen=True)
class Ping:
    value: int


@dataclass(frozen=True)
class PostcopyAdvise:
    pagesize_summary: int | None  # None: length-0 advise (dirty-bitmaps only)
    target_page_size: int | None


@dataclass(frozen=True)
class Discard:
    block: str
    ranges: list[tuple[int, int]]


@dataclass(frozen=True)
class PostcopyListen:
    pass


@dataclass(frozen=True)
class PostcopyRun:
    pass


@dataclass(frozen=True)
class Packaged:
    """The blob's nested stream is decoded inline: its events follow, up to POSTCOPY_RUN, which must
    come before the blob ends (bytes of the blob after RUN are dropped, as QEMU does)."""

    length: int


@dataclass(frozen=True)
class PostcopyResume:
    pass


@dataclass(frozen=True)
class RecvBitmapRequest:
    block: str


@dataclass(frozen=True)
class SwitchoverStart:
    pass


@dataclass(frozen=True)
class Eof:
    pass


@dataclass(frozen=True)
class VmDescription:
    json: bytes
    truncated: bool


# ----------------------------------------------------------------------------- decoder
_HEADER, _MAIN, _RAM, _AFTER_EOF, _VMDESC, _DONE = range(6)


@dataclass
class LocalBlock:
    name: str
    length: int
    page_size: int = TPS  # host page size of the block


@dataclass
class _Live:
    idstr: str
    instance_id: int
    version_id: int


class StreamDecoder:
    """Decode the main channel. `blocks` and `devices` describe the local machine."""

    def __init__(self, blocks: list[LocalBlock], devices: dict[tuple[str, int], VMStateDescription],
                 *, postcopy: bool = False, expect_header: bool = True, host_page_size: int = TPS,
                 buffer_size: int = 4 << 20, bare_ram: bool = False):
        """bare_ram: the postcopy-preempt channel, a bare sequence of RAM page records with its
        own CONTINUE context and no header, sections or footers."""
        self.blocks = {b.name: b for b in blocks}
        self.devices = devices
        self.postcopy = postcopy
        self.host_page_size = host_page_size
        self.buf = bytearray(buffer_size)
        self._arr = np.frombuffer(self.buf, dtype=np.uint8)
        self._addr = self._arr.ctypes.data
        self.start = 0  # first unparsed byte
        self.end = 0  # end of received bytes
        self.bare_ram = bare_ram
        self.phase = _RAM if bare_ram else (_HEADER if expect_header else _MAIN)
        self.sections: dict[int, _Live] = {}
        self.ram_section: int | None = None
        self.ram_kind = Section.START
        self.last_block: str | None = None
        self.advised = False
        self.vmdesc_left = 0
        self.vmdesc = bytearray()
        self.vmdesc_truncated = False
        self.bytes_consumed = 0
        self.package_end: int | None = None  # stream position where the PACKAGED blob being parsed ends
        self.package_skip = 0  # bytes of the blob left after its POSTCOPY_RUN (QEMU drops them)
        self.config_ok = not bare_ram  # CONFIGURATION may come first (after the header), once

    # -- buffer management
    @property
    def buffer_address(self) -> int:
        """Address of the receive buffer (fixed for the decoder's life)."""
        return self._addr

    def space(self, min_free: int = 64 << 10) -> memoryview:
        """Writable tail of the buffer for recv_into. Invalidates earlier Pages views."""
        if len(self.buf) - self.end < min_free and self.start > 0:
            n = self.end - self.start
            self.buf[0:n] = self.buf[self.start:self.end]
            self.start, self.end = 0, n
        return memoryview(self.buf)[self.end:]

    def commit(self, n: int) -> None:
        self.end += n

    def feed(self, data: bytes | memoryview) -> list:
        """Convenience for tests: push bytes, returning every event they complete (page data copied)."""
        events = []
        mv = memoryview(data)
        while True:
            while (ev := self.next_event()) is not None:
                if isinstance(ev, Pages):
                    ev = Pages(ev.block, ev.offsets, ev.data.copy(), ev.contiguous)
                events.append(ev)
            if not mv:
                return events
            sp = self.space()
            if not sp:
                raise ProtocolError(f"stream record larger than the {len(self.buf)}-byte buffer")
            n = min(len(sp), len(mv))
            sp[:n] = mv[:n]
            self.commit(n)
            mv = mv[n:]

    @property
    def done(self) -> bool:
        return self.phase == _DONE

    @property
    def pending(self) -> int:
        return self.end - self.start

    def finish(self) -> None:
        """The input ended: fine after EOF, a truncated stream otherwise."""
        if self.phase in (_AFTER_EOF, _DONE):
            self.phase = _DONE
            return
        if self.phase == _VMDESC:
            self.phase = _DONE  # a cut vmdesc only loses the description
            return
        if self.bare_ram and self.pending == 0:
            self.phase = _DONE  # the preempt channel just closes after its last record
            return
        raise ProtocolError(f"migration stream truncated ({self.pending} unparsed bytes at the end)")

    def reconnect(self) -> None:
        """Postcopy recovery: the old connection is gone with whatever part of a record it held;
        the new one starts with a command (no header), in a fresh CONTINUE context."""
        if self.package_end is not None:
            raise ProtocolError("connection lost inside the postcopy package: cannot recover")
        self.start = self.end = 0
        self.last_block = None
        self.package_skip = 0  # the rest of the package after RUN was on the old connection
        if self.phase not in (_AFTER_EOF, _DONE, _VMDESC):
            self.phase = _RAM if self.bare_ram else _MAIN

    # -- decoding
    def next_event(self):
        """The next complete event, or None when more input is needed (or the stream is done)."""
        while True:
            before = (self.start, self.phase)
            ev = self._step()
            if ev is not None:
                return ev
            if self.phase == _DONE or (self.start, self.phase) == before:
                return None

    def _step(self):
        if self.phase == _DONE:
            return None
        if self.phase == _VMDESC:
            return self._drain_vmdesc()
        if self.package_skip:
            n = min(self.package_skip, self.end - self.start)
            self.start += n
            self.bytes_consumed += n
            self.package_skip -= n
            return None
        if self.package_end is not None and self.bytes_consumed == self.package_end:
            raise ProtocolError("PACKAGED blob ended without POSTCOPY_RUN")
        if self.phase == _RAM:
            fast = self._ram_run()
            if fast is _NEED_MORE:
                return None
            if fast is not None:
                return fast
        limit = self._limit()
        cur = Cursor(self.buf, self.start, limit)
        try:
            ev = self._one(cur)
        except Incomplete:
            if limit < self.end:
                raise ProtocolError("a record runs past the end of its PACKAGED blob") from None
            if self.start == 0 and self.end == len(self.buf):
                raise ProtocolError(f"stream record larger than the {len(self.buf)}-byte buffer") from None
            return None
        except (UnicodeDecodeError, struct.error, ValueError) as e:
            raise ProtocolError(f"malformed stream: {e}") from None
        self.bytes_consumed += cur.pos - self.start
        self.start = cur.pos
        return ev

    def _limit(self) -> int:
        """End of the parseable window: the received bytes, cut at the end of a PACKAGED blob."""
        if self.package_end is None:
            return self.end
        return min(self.end, self.start + (self.package_end - self.bytes_consumed))

    def _one(self, cur: Cursor):
        if self.phase == _HEADER:
            magic, version = cur.be32(), cur.be32()
            if magic != MAGIC:
                hint = " (a TLS handshake: the source uses TLS; set tls-creds here too)" if magic >> 16 == 0x1603 else ""
                raise ProtocolError(f"not a migration stream: magic 0x{magic:08x}, expected 0x{MAGIC:08x}{hint}")
            if version == VERSION_COMPAT:
                raise ProtocolError("stream version 2 (COMPAT) is obsolete and not supported")
            if version != VERSION:
                raise ProtocolError(f"unsupported stream version {version}, expected {VERSION}")
            self.phase = _MAIN
            return Header(version)
        if self.phase == _RAM:
            return self._ram_record(cur)
        if self.phase == _AFTER_EOF:
            t = cur.u8()
            if t != Section.VMDESCRIPTION:
                self.phase = _DONE  # QEMU only logs a missing description
                return None
            self.vmdesc_left = cur.be32()
            self.phase = _VMDESC
            return None
        t = cur.u8()
        if t != Section.CONFIGURATION:
            self.config_ok = False
        elif not self.config_ok:
            raise ProtocolError("CONFIGURATION section in the middle of the stream (only right after the header)")
        else:
            n = cur.be32()
            if n > 255:
                raise ProtocolError(f"machine type name of {n} bytes in CONFIGURATION")
            raw = cur.read(n)
            if cur.peek_u8() == Section.SUBSECTION:
                raise ProtocolError("CONFIGURATION subsections (validated capabilities, page bits, uuid) are not supported")
            self.config_ok = False
            return Configuration(raw.decode("ascii", "replace"))
        if t in (Section.START, Section.FULL):
            sid = cur.be32()
            idstr = cur.counted_string("section idstr")
            inst, ver = cur.be32(), cur.be32()
            if t == Section.START:
                if (idstr, inst) != (R.IDSTR, R.INSTANCE):
                    raise ProtocolError(f"Unknown section or instance '{idstr}' {inst}")
                if ver != R.VERSION:
                    raise ProtocolError(f"ram section version {ver}, expected {R.VERSION}")
                self.sections[sid] = _Live(idstr, inst, ver)
                self._enter_ram(sid, Section.START)
                return None
            vmsd = self.devices.get((idstr, inst))
            if vmsd is None:
                raise ProtocolError(f"Unknown section or instance '{idstr}' {inst}")
            if ver > vmsd.version_id:
                raise ProtocolError(f"section '{idstr}' version {ver} is newer than ours ({vmsd.version_id})")
            values = vmstate_decode(vmsd, cur, ver)
            self._footer(cur, sid)
            return DeviceState(idstr, inst, ver, values)
        if t in (Section.PART, Section.END):
            sid = cur.be32()
            if sid not in self.sections:
                raise ProtocolError(f"unknown section id {sid} in {Section(t).name}")
            self._enter_ram(sid, Section(t))
            return None
        if t == Section.COMMAND:
            return self._command(cur)
        if t == Section.EOF:
            if self.package_end is not None:
                raise ProtocolError("EOF inside a PACKAGED blob (the package must end with POSTCOPY_RUN)")
            self.phase = _AFTER_EOF
            return Eof()
        raise ProtocolError(f"unknown section type 0x{t:02x}")

    def _enter_ram(self, sid: int, kind: Section) -> None:
        self.ram_section = sid
        self.ram_kind = kind
        self.phase = _RAM

    def _footer(self, cur: Cursor, sid: int) -> None:
        mark = cur.u8()
        if mark != Section.FOOTER:
            raise ProtocolError(f"Missing section footer for section {sid} (got 0x{mark:02x})")
        got = cur.be32()
        if got != sid:
            raise ProtocolError(f"Mismatched section id in footer: {got}, expected {sid}")

    # -- RAM
    def _block(self, name: str) -> LocalBlock:
        b = self.blocks.get(name)
        if b is None:
            raise ProtocolError(f"unknown RAM block '{name}'")
        return b

    def _check_offset(self, block: LocalBlock, offset: int) -> None:
        if offset + TPS > block.length:
            raise ProtocolError(f"page offset 0x{offset:x} outside RAM block '{block.name}' of 0x{block.length:x} bytes")

    def _ram_record(self, cur: Cursor):
        word = cur.be64()
        flags = word & _PAGE_MASK
        offset = word & ~_PAGE_MASK
        if flags >= R.FLAGS_MAX:
            raise ProtocolError(f"RAM flags 0x{flags:x} out of range")
        kind = flags & ~R.FLAG_CONTINUE
        if kind == R.FLAG_EOS and self.bare_ram:
            return None  # pre-7.2 QEMU ends its preempt channel with an EOS
        if kind == R.FLAG_MEM_SIZE and self.bare_ram:
            raise ProtocolError("MEM_SIZE record on the postcopy-preempt channel")
        if kind == R.FLAG_EOS:
            self._footer(cur, self.ram_section)
            self.phase = _MAIN
            return SectionEnd(self.ram_section, self.ram_kind)
        if kind == R.FLAG_MEM_SIZE:
            return self._mem_size(cur, offset)
        if kind == R.FLAG_MULTIFD_FLUSH:
            if self.bare_ram:
                raise ProtocolError("MULTIFD_FLUSH record on the postcopy-preempt channel")
            return MultifdFlush()
        if kind in (R.FLAG_PAGE, R.FLAG_ZERO):
            if flags & R.FLAG_CONTINUE:
                if self.last_block is None:
                    raise ProtocolError("bad migration stream: CONTINUE page with no previous RAM block")
                name = self.last_block
            else:
                name = cur.counted_string("RAM block name")
            block = self._block(name)
            self._check_offset(block, offset)
            off = np.array([offset], dtype=np.uint64)
            if kind == R.FLAG_ZERO:
                fill = cur.u8()
                if fill != 0:
                    raise ProtocolError(f"ZERO page with fill byte 0x{fill:02x}")
                self.last_block = name
                return ZeroPages(name, off)
            cur.need(TPS)
            data = self._arr[cur.pos:cur.pos + TPS].reshape(1, TPS)
            cur.pos += TPS
            self.last_block = name
            return Pages(name, off, data, True)
        if kind == R.FLAG_XBZRLE:
            raise ProtocolError("XBZRLE pages are not supported (capability xbzrle is off)")
        if kind == R.FLAG_HOOK:
            raise ProtocolError("RAM_SAVE_FLAG_HOOK (RDMA) is not supported")
        raise ProtocolError(f"Unknown combination of migration flags: 0x{flags:x}")

    def _mem_size(self, cur: Cursor, total: int):
        if self.ram_kind != Section.START:
            raise ProtocolError("MEM_SIZE record outside the RAM setup section")
        blocks = []
        left = total
        while left > 0:
            if cur.peek_u8() == 0:
                raise ProtocolError(f"RAM block list ends with 0x{left:x} of the announced total 0x{total:x} bytes "
                                    "unaccounted for (the total does not match the block list)")
            name = cur.counted_string("RAM block name")
            length = cur.be64()
            local = self._block(name)
            if length != local.length:
                raise ProtocolError(f"RAM block '{name}' length 0x{length:x} differs from ours (0x{local.length:x})")
            page_size = None
            if self.postcopy and self.advised and local.page_size != max(self.host_page_size, TPS):
                page_size = cur.be64()
                if page_size != local.page_size:
                    raise ProtocolError(f"RAM block '{name}' page size {page_size} differs from ours ({local.page_size})")
            if length > left:
                raise ProtocolError("RAM block lengths exceed the announced total")
            left -= length
            blocks.append(R.BlockInfo(name, length, page_size))
        if cur.peek_u8() != 0:  # EOS or MULTIFD_FLUSH follow the list; their words start with 0x00
            raise ProtocolError(f"RAM block list is longer than the announced total 0x{total:x} bytes "
                                "(the total does not match the block list)")
        return RamSetup(blocks)

    def next_page_record(self) -> tuple[int, int] | None:
        """Fast path of the postcopy-preempt channel, where a requested page usually arrives
        alone: if the buffer starts with one whole CONTINUE|PAGE record, consume it and return
        (page offset, position of its data in `buf`); otherwise None (then use next_event, which
        also reports a bad record). The data stays valid until the next space()."""
        if not self.bare_ram or self.last_block is None or self.end - self.start < R.PAGE_RECORD:
            return None
        (word,) = _BE64.unpack_from(self.buf, self.start)
        offset = word & ~_PAGE_MASK
        if word & _PAGE_MASK != _CP or offset + TPS > self.blocks[self.last_block].length:
            return None
        pos = self.start + 8
        self.start = pos + TPS
        self.bytes_consumed += R.PAGE_RECORD
        return offset, pos

    def _ram_run(self):
        """Vectorised path: a run of CONTINUE|PAGE or CONTINUE|ZERO records. A few numpy calls per
        run whatever its length (the loader meets one run per receive)."""
        start = self.start
        n = self._limit() - start
        if n < 8:
            return _NEED_MORE if self.package_end is None else None
        if self.last_block is None:
            return None
        (word,) = _BE64.unpack_from(self.buf, start)
        flags = word & _PAGE_MASK
        if flags == _CP:
            size = R.PAGE_RECORD
        elif flags == _CZ:
            size = R.ZERO_RECORD
        else:
            return None
        avail = n // size
        if avail < 2:
            if avail == 0 and self.package_end is None:
                return _NEED_MORE  # the rest of this record has not arrived yet
            return None  # the single-record path handles it (and Incomplete)
        block = self._block(self.last_block)
        last_ok = block.length - TPS
        if last_ok < 0:
            return None
        words = np.ndarray((avail,), _BE_U64, self.buf, start, (size,))  # header words, in place
        rec = np.ndarray((avail, size), np.uint8, self.buf, start, (size, 1))
        # the common case, each record the page after the one before: one comparison checks the
        # flags and offsets of all of them. m: how many from the first on are so
        eq = words == (_STEPS[:avail] if avail <= _STEPS.size
                       else np.arange(avail, dtype=np.uint64) * np.uint64(TPS)) + np.uint64(word)
        m = int(eq.argmin())
        if eq[m]:
            m = avail
        k = min(m, (last_ok - (word - flags)) // TPS + 1)  # ... and inside the block
        if (k == avail or k >= _MIN_SPLIT) and (size == R.PAGE_RECORD or not rec[:k, 8].any()):
            contiguous = True  # the whole run, or a long enough start of it (the rest comes next)
        else:
            # scattered pages: a record ends the run if its flags differ or its page lies outside
            # the block (then the single-record path reports it, with the same message whatever
            # the chunking)
            bad = (words & np.uint64(_PAGE_MASK)) != np.uint64(flags)
            bad |= words > np.uint64(last_ok + flags)
            if size == R.ZERO_RECORD:
                bad |= rec[:, 8] != 0
            k = int(bad.argmax())
            if not bad[k]:
                k = avail
            elif k == 0:
                return None
            contiguous = m >= k
        offsets = words[:k] - np.uint64(flags)
        self.bytes_consumed += k * size
        self.start = start + k * size
        if size == R.ZERO_RECORD:
            return ZeroPages(block.name, offsets)
        data = rec[:k, 8:]
        data.flags.writeable = False
        return Pages(block.name, offsets, data, contiguous)

    # -- commands
    def _command(self, cur: Cursor):
        cmd_no, n = cur.be16(), cur.be16()
        try:
            cmd = Cmd(cmd_no)
        except ValueError:
            raise ProtocolError(f"unknown migration command {cmd_no}") from None
        fixed = CMD_LEN[cmd]
        if fixed is not None and n != fixed:
            raise ProtocolError(f"command {cmd.name} has length {n}, expected {fixed}")
        body = Cursor(cur.read(n))
        try:
            ev = self._command_body(cmd, n, body)
        except Incomplete:
            # the payload is all there: a field that runs past it is malformed, not pending
            raise ProtocolError(f"command {cmd.name}: {n}-byte payload is too short for its contents") from None
        here = self.bytes_consumed + (cur.pos - self.start)  # stream position after this command
        if cmd is Cmd.PACKAGED:
            if self.package_end is not None:
                raise ProtocolError("PACKAGED command inside a PACKAGED blob")
            self.package_end = here + ev.length
        elif cmd is Cmd.POSTCOPY_RUN and self.package_end is not None:
            self.package_skip = self.package_end - here
            self.package_end = None
        return ev

    def _command_body(self, cmd: Cmd, n: int, body: Cursor):
        if cmd is Cmd.OPEN_RETURN_PATH:
            return OpenReturnPath()
        if cmd is Cmd.PING:
            return Ping(body.be32())
        if cmd is Cmd.POSTCOPY_ADVISE:
            if n not in (0, 16):
                raise ProtocolError(f"POSTCOPY_ADVISE of {n} bytes (expected 0 or 16)")
            if n == 16 and not self.postcopy:
                raise ProtocolError("RAM postcopy is disabled on the destination but the source advised it "
                                    "(set capability postcopy-ram on both sides)")
            if n == 0 and self.postcopy:
                raise ProtocolError("postcopy-ram is enabled on the destination but the source did not advise it "
                                    "(set capability postcopy-ram on both sides)")
            if self.advised:
                raise ProtocolError("POSTCOPY_ADVISE received twice")
            self.advised = True
            if n == 0:
                return PostcopyAdvise(None, None)
            return PostcopyAdvise(body.be64(), body.be64())
        if cmd is Cmd.POSTCOPY_RAM_DISCARD:
            if n < 20:
                raise ProtocolError(f"POSTCOPY_RAM_DISCARD of {n} bytes is too short")
            if body.u8() != 0:
                raise ProtocolError("POSTCOPY_RAM_DISCARD version is not 0")
            name = body.counted_string("RAM block name")
            if body.u8() != 0:
                raise ProtocolError("POSTCOPY_RAM_DISCARD: missing NUL after the block name")
            if body.remaining % 16:
                raise ProtocolError("POSTCOPY_RAM_DISCARD: ranges are not a multiple of 16 bytes")
            block = self._block(name)
            ranges = []
            while body.remaining:
                s, ln = body.be64(), body.be64()
                if s % TPS or ln % TPS or s + ln > block.length:
                    raise ProtocolError(f"discard range 0x{s:x}+0x{ln:x} outside or misaligned in block '{name}'")
                ranges.append((s, ln))
            return Discard(name, ranges)
        if cmd is Cmd.POSTCOPY_LISTEN:
            return PostcopyListen()
        if cmd is Cmd.POSTCOPY_RUN:
            return PostcopyRun()
        if cmd is Cmd.PACKAGED:
            length = body.be32()
            if length > MAX_PACKAGED_SIZE:
                raise ProtocolError(f"PACKAGED blob of {length} bytes is too large")
            return Packaged(length)
        if cmd is Cmd.POSTCOPY_RESUME:
            return PostcopyResume()
        if cmd is Cmd.RECV_BITMAP:
            if n < 2:
                raise ProtocolError("RECV_BITMAP without a block name")
            name = body.counted_string("RAM block name")
            if body.remaining:
                raise ProtocolError("RECV_BITMAP length does not match its block name")
            self._block(name)
            return RecvBitmapRequest(name)
        if cmd is Cmd.SWITCHOVER_START:
            return SwitchoverStart()
        raise ProtocolError(f"migration command {cmd.name} is not supported")

    # -- trailing description
    def _drain_vmdesc(self):
        n = min(self.vmdesc_left, self.end - self.start)
        if n == 0 and self.vmdesc_left:
            return None
        keep = max(0, min(n, VMDESC_KEEP - len(self.vmdesc)))
        self.vmdesc += self.buf[self.start:self.start + keep]
        if keep < n:
            self.vmdesc_truncated = True
        self.start += n
        self.bytes_consumed += n
        self.vmdesc_left -= n
        if self.vmdesc_left:
            return None
        self.phase = _DONE
        return VmDescription(bytes(self.vmdesc), self.vmdesc_truncated)
