"""The urgent postcopy processes and what they share with their parent: control messages with file
descriptors, shared arrays, the pipe lock, reading the parent's memory, and the destination's
urgent process serving real userfaultfd faults over a socket (no guest needed)."""
import ctypes
import mmap
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from livemig.helperproc import recv_msg, send_msg
from livemig.postcopy import PostcopyDestination, minor_faults_supported
from livemig.ramblock import RamBlock
from livemig.shm import PipeLock, nonzero_of_shared, shared_array
from livemig.uffd import probe
from livemig.urgent_dst import UrgentProcess
from livemig.urgent_src import RemoteRam
from livemig.wire import ram as WR
from livemig.wire import returnpath as RPW

TPS = 4096


def test_control_messages_carry_descriptors():
    a, b = socket.socketpair()
    r, w = os.pipe()
    send_msg(a, {"op": "x", "n": [1, 2]}, [w])
    send_msg(a, {"op": "y"})
    msg, fds = recv_msg(b)
    assert msg == {"op": "x", "n": [1, 2]} and len(fds) == 1
    os.write(fds[0], b"hi")  # the received descriptor is the pipe's write end
    assert os.read(r, 2) == b"hi"
    assert recv_msg(b) == ({"op": "y"}, [])
    a.close()
    assert recv_msg(b) == (None, [])
    for fd in (r, w, fds[0]):
        os.close(fd)
    b.close()


def test_shared_array_is_the_same_memory():
    fd, a = shared_array(100, np.int64)
    _, b = shared_array(100, np.int64, fd=fd)
    a[7] = 12345
    assert b[7] == 12345 and b.sum() == 12345
    os.close(fd)


def test_nonzero_of_shared_while_another_process_writes():
    """Another process sets and clears every 7th item while we ask which are set: each answer
    names only such items (numpy's own nonzero on the live memory returns unfilled entries
    then; CI once saw page 96016 of a 65536-page guest come out of it)."""
    fd, a = shared_array(1000)
    code = ("import sys; from livemig.shm import shared_array\n"
            "_, a = shared_array(1000, fd=int(sys.argv[1]))\n"
            "print('go', flush=True)\n"
            "while True: a[::7] = True; a[::7] = False\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(fd)], pass_fds=[fd], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "go\n"
        seen = 0
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            for _ in range(200):
                hits = nonzero_of_shared(a[0:1000])
                assert ((hits >= 0) & (hits < 1000) & (hits % 7 == 0)).all(), hits
                seen += hits.size
        assert seen > 0  # the child did write
    finally:
        child.kill()
        child.wait()
        os.close(fd)


def test_pipe_lock_excludes_another_process():
    """A child attached to the lock waits while the parent holds it."""
    lock = PipeLock()
    code = ("import sys, time; from livemig.shm import PipeLock\n"
            "l = PipeLock((int(sys.argv[1]), int(sys.argv[2])))\n"
            "with l: print(time.monotonic(), flush=True)\n")
    with lock:
        child = subprocess.Popen([sys.executable, "-c", code, str(lock.r), str(lock.w)],
                                 pass_fds=lock.fds, stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        released = time.monotonic()
    out, _ = child.communicate(timeout=30)
    assert child.returncode == 0 and float(out) >= released
    with lock:  # the child gave it back
        pass
    lock.close()


def test_remote_ram_copies_pages_and_drops_them():
    src = np.arange(4 * TPS, dtype=np.uint32).view(np.uint8)[:4 * TPS].copy()
    mirror = mmap.mmap(-1, 4 * TPS, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    local = np.frombuffer(mirror, np.uint8)
    rr = RemoteRam(os.getpid(), src.ctypes.data, local.ctypes.data)
    rr.read(TPS, 2 * TPS)
    assert (local[TPS:3 * TPS] == src[TPS:3 * TPS]).all() and not local[:TPS].any()
    rr.drop(TPS, 2 * TPS)
    assert not local.any()
    with pytest.raises(OSError):
        RemoteRam(os.getpid(), 0, local.ctypes.data).read(0, TPS)  # nothing mapped there


@pytest.mark.skipif(not probe()[0], reason=f"userfaultfd unavailable: {probe()[2]}")
@pytest.mark.parametrize("backend", ["UFFDIO_COPY", "UFFDIO_CONTINUE"])
def test_destination_urgent_process_serves_faults(backend):
    """The destination's urgent process reads the faults of a thread here from userfaultfd, asks
    for the pages on the 'preempt connection' (a socket whose other end plays the source here),
    places what comes back, and hands back its figures; a page placed here meanwhile is
    reported to it so its latency counts too."""
    npages = 64
    fd = None
    if backend == "UFFDIO_CONTINUE":
        if not minor_faults_supported():
            pytest.skip("userfaultfd here has no minor faults on shared memory")
        fd = os.memfd_create("test-ram")
        os.ftruncate(fd, npages * TPS)
        m = mmap.mmap(fd, npages * TPS, mmap.MAP_SHARED)
    else:
        m = mmap.mmap(-1, npages * TPS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    rfd, received = shared_array(npages)
    urgent = UrgentProcess()
    pc = PostcopyDestination(RamBlock("pc.ram", m), addr, lambda b: None, received, np.zeros(npages, bool),
                             lambda: [], ram_fd=fd, urgent=urgent, received_fd=rfd)
    assert pc.minor == (fd is not None)
    pc.advise()
    pc.listen()
    here, there = socket.socketpair()
    here.settimeout(20)  # a dead urgent process fails the test instead of hanging it
    urgent.give_preempt(there)
    got = {}

    def touch(page: int) -> None:  # ctypes copies without the GIL: the fault blocks only this thread
        buf = ctypes.create_string_buffer(8)
        ctypes.memmove(buf, addr + page * TPS, 8)
        got[page] = buf.raw

    readers = [threading.Thread(target=touch, args=(p,)) for p in (5, 9)]
    for t in readers:
        t.start()
    dec = RPW.RPDecoder()
    want: set[int] = set()
    deadline = time.monotonic() + 20
    while len(want) < 2:
        assert time.monotonic() < deadline, f"requests seen: {want}"
        dec.feed(here.recv(4096))
        while (msg := dec.next_message()) is not None:
            assert isinstance(msg, RPW.ReqPages) and msg.block == "pc.ram" and msg.length == TPS
            want.add(msg.start // TPS)
    assert want == {5, 9}
    page5 = np.full(TPS, 0x55, np.uint8).tobytes()
    here.sendall(WR.page_header(5 * TPS, WR.FLAG_PAGE, "pc.ram") + page5)  # first record: named
    pc.place_pages(np.array([9]), np.full((1, TPS), 0x99, np.uint8))  # page 9 comes on the main stream
    for t in readers:
        t.join(timeout=20)
        assert not t.is_alive()
    assert got == {5: b"\x55" * 8, 9: b"\x99" * 8}
    here.shutdown(socket.SHUT_WR)  # the source ends the preempt connection: the process reports
    end = urgent.wait()
    assert end["op"] == "done" and end["normal"] == 1, end
    pc.merge(end["stats"])
    for page, when in urgent.drain_arrivals():
        pc._requested_arrived(page, when)
    assert pc.requests == 2 and len(pc.latencies) == 2 and not pc.requested.any()
    assert received[[5, 9]].all() and received.sum() == 2
    pc.start_fault_thread()  # as the loader's process does once the process has ended
    pc.finish()
    pc.release()
    here.close()
    there.close()
    if fd is not None:
        os.close(fd)
