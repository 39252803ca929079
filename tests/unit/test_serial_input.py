"""Console input into the 16550 UART: a backend feeds no more than the receive FIFO takes, so
input that the guest reads slowly waits in the socket instead of being lost to an overrun."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from livemig.machine.chardev import UnixServerBackend
from livemig.machine.devices import (RX_FIFO_SIZE, UART_FCR_FE, UART_LSR_DR, UART_LSR_OE,
                                     Serial16550)

BASE = 0x3F8


def _wait(cond, timeout: float = 5.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        time.sleep(0.005)


@pytest.mark.parametrize("fifo", [True, False], ids=["fifo", "no-fifo"])
def test_typed_text_longer_than_the_fifo_arrives_whole(tmp_path, fifo):
    path = str(tmp_path / "con.sock")
    backend = UnixServerBackend(path)
    uart = Serial16550(backend)
    if fifo:
        uart.pio_write(BASE + 2, 1, UART_FCR_FE)
    cap = RX_FIFO_SIZE if fifo else 1
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(path)
        text = bytes(range(0x21, 0x21 + 90)) + b"\n"
        client.sendall(text)
        _wait(lambda: len(uart.rx) == cap)
        time.sleep(0.2)  # the rest waits in the socket: the FIFO neither grows nor overruns
        assert len(uart.rx) == cap
        got = bytearray()
        lsr_seen = 0
        while len(got) < len(text):  # the guest reads slowly, a byte at a time
            _wait(lambda: uart.pio_read(BASE + 5, 1) & UART_LSR_DR)
            lsr_seen |= uart.lsr
            got.append(uart.pio_read(BASE, 1))
        assert bytes(got) == text
        assert not lsr_seen & UART_LSR_OE, "the receive FIFO overran"
    finally:
        client.close()
        backend.close()


def test_room_wakes_when_the_guest_reads(tmp_path):
    backend = UnixServerBackend(str(tmp_path / "con.sock"))
    uart = Serial16550(backend)
    try:
        uart.pio_write(BASE + 2, 1, UART_FCR_FE)
        uart.receive(b"x" * RX_FIFO_SIZE)
        assert uart.room(0) == 0
        t0 = time.monotonic()
        assert uart.room(0.05) == 0 and time.monotonic() - t0 >= 0.04
        uart.pio_read(BASE, 1)
        assert uart.room(0) == 1
    finally:
        backend.close()


def test_input_during_a_transmit_edge_leaves_the_interrupt_line_as_the_uart_says():
    """The guest writes THR (the THR-empty interrupt drops and comes back: two line changes) while
    the input thread receives a byte. The line KVM last heard must agree with the UART's model,
    or no edge ever comes again and the console stops (replays the interleaving)."""
    from livemig.machine.chardev import NullBackend
    line: list[int] = []
    fired, done = [], threading.Event()

    def irq(level: int) -> None:
        if level == 0 and not fired:  # the input thread gets in between the model and the line
            fired.append(1)
            threading.Thread(target=lambda: (uart.receive(b"x"), done.set())).start()
            done.wait(0.3)  # it finishes now unless the transmit path holds the UART's lock
        line.append(level)

    uart = Serial16550(NullBackend(), irq_handler=irq)
    uart.pio_write(BASE + 1, 1, 0x03)  # IER: receive data and THR empty
    uart.pio_write(BASE, 1, ord("a"))
    assert done.wait(5)
    assert uart.lsr & UART_LSR_DR and uart.irq_level == 1 and line[-1] == 1, (line, uart.irq_level)
