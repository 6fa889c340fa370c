"""loadtest.host_micro, the host micro-benchmarks: each run reports every measurement it names."""

from __future__ import annotations

import re

import pytest

from loadtest.host_micro import main


def test_fault_reports_writes_and_both_ways_of_paging_in(
    capsys: pytest.CaptureFixture[str],
) -> None:
    main(["fault", "--size", "32MiB"])
    out = capsys.readouterr().out
    for label in ("first-touch writes", "writes once backed"):
        assert re.search(rf"{label}\s+\d+\.\d+ GiB/s", out), out
    for how in ("mmap.madvise", "ctypes madvise"):
        assert re.search(rf"populate via {how}\s+\d+\.\d+ GiB/s, .* \d+\.\d ms", out), out


def test_send_reports_every_source_twice(capsys: pytest.CaptureFixture[str]) -> None:
    main(["send", "--seconds", "0.05"])
    out = capsys.readouterr().out
    for source in map(re.escape, ("bytes", "torch", "memfd", "anon+hugepage", "sendfile(memfd)")):
        assert (
            len(re.findall(rf"^{source}\s+\d+\.\d+ GB/s\s+sender CPU\s+\d+ us/MiB$", out, re.M))
            == 2
        )


def test_a_size_that_is_not_whole_chunks_is_refused() -> None:
    with pytest.raises(SystemExit):
        main(["fault", "--size", "20MiB"])
