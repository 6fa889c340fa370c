"""Micro-benchmarks of the host under the gateway: what the kernel costs, measured without it.

    python -m loadtest.host_micro send      # CPU per 1 MiB loopback TCP send, by source memory
    python -m loadtest.host_micro fault     # first-touch writes, paging in, and the GIL

``send``: one process sends 1 MiB messages over loopback TCP to a forked reader that takes each
with ``recv_into`` and acknowledges it with one byte. It reports GB/s and the sender's CPU per
MiB for sources in ``bytes``, a torch tensor, a memfd mapping and huge-page anonymous memory,
and ``os.sendfile`` from the memfd. That CPU is the floor of any HTTP GET of 1 MiB on loopback.

``fault``: writes of 1 MiB into memory never touched before, against memory already backed,
the rate of ``MADV_POPULATE_WRITE`` (tiers.arena ``prefault``), and the longest gap a Python
thread sees while another thread pages 2 GiB in through ``mmap.madvise`` (which holds the GIL)
and through ctypes (which lets go of it). docs/benchmarks.md shows runs.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import resource
import socket
import threading
import time
from collections.abc import Callable, Sequence

from loadtest.sizes import parse_size

MiB = 1 << 20
BLOCKS = 64  # distinct 1 MiB sources, as the hot-get scenario's working set
POPULATE_WRITE = 23


def _reader(port: int) -> None:
    conn = socket.create_connection(("127.0.0.1", port))
    buf = bytearray(MiB)
    view = memoryview(buf)
    while True:
        got = 0
        while got < MiB:
            n = conn.recv_into(view[got:])
            if n == 0:
                os._exit(0)
            got += n
        conn.send(b"x")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _measure(
    name: str, send_one: Callable[[int], None], ack: socket.socket, seconds: float
) -> None:
    n, started, cpu0 = 0, time.perf_counter(), _cpu()
    while time.perf_counter() - started < seconds:
        send_one(n % BLOCKS)
        ack.recv(1)
        n += 1
    elapsed, cpu = time.perf_counter() - started, _cpu() - cpu0
    print(f"{name:16s} {n * MiB / elapsed / 1e9:6.2f} GB/s  sender CPU {cpu / n * 1e6:5.0f} us/MiB")


def send(seconds: float) -> None:
    import torch

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    if os.fork() == 0:
        _reader(port)
    conn, _ = server.accept()
    size = BLOCKS * MiB
    as_bytes = [memoryview(os.urandom(MiB)) for _ in range(BLOCKS)]
    tensor = torch.randint(0, 255, (size,), dtype=torch.uint8)
    tview = memoryview(tensor.numpy().data)
    fd = os.memfd_create("host-micro")
    os.ftruncate(fd, size)
    memfd = mmap.mmap(fd, size)
    memfd.write(os.urandom(size))
    huge = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    huge.madvise(mmap.MADV_HUGEPAGE)
    huge.write(os.urandom(size))
    sources: dict[str, Sequence[memoryview]] = {
        "bytes": as_bytes,
        "torch": [tview[i * MiB : (i + 1) * MiB] for i in range(BLOCKS)],
        "memfd": [memoryview(memfd)[i * MiB : (i + 1) * MiB] for i in range(BLOCKS)],
        "anon+hugepage": [memoryview(huge)[i * MiB : (i + 1) * MiB] for i in range(BLOCKS)],
    }

    def sendfile(i: int) -> None:
        offset, left = i * MiB, MiB
        while left:
            sent = os.sendfile(conn.fileno(), fd, offset, left)
            offset += sent
            left -= sent

    for _ in range(2):  # the second pass is the one to read: the first warms up
        for name, views in sources.items():

            def send_view(i: int, views: Sequence[memoryview] = views) -> None:
                conn.sendall(views[i])

            _measure(name, send_view, conn, seconds)
        _measure("sendfile(memfd)", sendfile, conn, seconds)
    conn.close()


def _write_rate(view: memoryview) -> float:
    """GiB/s of 1 MiB writes over all of ``view``."""
    src = b"x" * MiB
    started = time.perf_counter()
    for i in range(len(view) // MiB):
        view[i * MiB : (i + 1) * MiB] = src
    return len(view) / (1 << 30) / (time.perf_counter() - started)


def _longest_gap(populate: Callable[[int, int], None], size: int) -> tuple[float, float]:
    def run() -> None:
        for offset in range(0, size, 16 * MiB):
            populate(offset, 16 * MiB)

    thread = threading.Thread(target=run)
    started = time.perf_counter()
    thread.start()
    longest, last = 0.0, time.perf_counter()
    while thread.is_alive():
        now = time.perf_counter()
        longest, last = max(longest, now - last), now
    return longest, time.perf_counter() - started


def fault(size: int) -> None:
    gib = size / (1 << 30)
    fresh = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = memoryview(fresh)
    print(f"first-touch writes   {_write_rate(view):6.2f} GiB/s")
    print(f"writes once backed   {_write_rate(view):6.2f} GiB/s")
    view.release()
    fresh.close()
    libc = ctypes.CDLL(None, use_errno=True)
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for how in ("mmap.madvise", "ctypes madvise"):
        area = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        holder = ctypes.c_char.from_buffer(area)
        address = ctypes.addressof(holder)
        del holder

        def via_mmap(offset: int, length: int, area: mmap.mmap = area) -> None:
            area.madvise(POPULATE_WRITE, offset, length)

        def via_ctypes(offset: int, length: int, address: int = address) -> None:
            madvise(address + offset, length, POPULATE_WRITE)

        gap, took = _longest_gap(via_mmap if how == "mmap.madvise" else via_ctypes, size)
        print(
            f"populate via {how:15s} {gib / took:6.2f} GiB/s, longest gap of another "
            f"thread {gap * 1000:6.1f} ms"
        )
        area.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.host_micro",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="what", required=True)
    p_send = sub.add_parser("send", help="CPU per 1 MiB loopback send, by source memory")
    p_send.add_argument("--seconds", type=float, default=2.0, help="per source and pass (2)")
    p_fault = sub.add_parser("fault", help="first-touch writes, paging in, and the GIL")
    p_fault.add_argument(
        "--size", type=parse_size, default=2 << 30, metavar="SIZE", help="per measurement (2GiB)"
    )
    args = parser.parse_args(argv)
    if args.what == "send":
        send(args.seconds)
    else:
        if args.size < 16 * MiB or args.size % (16 * MiB):
            parser.error("--size must be a multiple of 16MiB")
        fault(args.size)


if __name__ == "__main__":
    main()
