"""Console output that the host cannot take: the guest loses that output, never its vCPU."""
from __future__ import annotations

import subprocess
import sys
import time

from livemig.machine.chardev import FileBackend


def test_a_file_backend_on_a_full_disk_drops_output_instead_of_raising(capfd):
    out = FileBackend("/dev/full")  # every write fails with ENOSPC
    out.write(b"hello")
    out.write(b"again")  # dropped quietly from here
    out.close()
    assert "No space left on device" in capfd.readouterr().err


def test_stdio_output_to_a_pipe_nobody_reads_does_not_block():
    """A full stdout pipe would block the vCPU thread in write(), and with it pause and quit."""
    code = ("from livemig.machine.chardev import StdioBackend\n"
            "b = StdioBackend()\n"
            "for _ in range(4096):\n"
            "    b.write(b'x' * 64)\n"  # 256 KiB: four times what a pipe holds
            "print('done', file=__import__('sys').stderr)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    t0 = time.monotonic()
    while p.poll() is None and time.monotonic() - t0 < 20:
        time.sleep(0.05)
    try:
        assert p.poll() == 0, "the writer blocked on a full pipe"
        assert b"done" in p.stderr.read()
    finally:
        p.kill()
        p.wait()
