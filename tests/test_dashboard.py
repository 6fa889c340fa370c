"""The dashboard in a real headless Chromium against a real server on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.client import KVGateClient
from gateway.config import TenantConfig
from gateway.telemetry import Telemetry, TelemetryConfig
from tests.conftest import running_gateway
from tests.obskit import BLOCK, Served, build_app, quiesce, serve
from tests.tierkit import payload

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    explicit = os.environ.get("KVGATE_CHROMIUM")
    if explicit:
        return explicit
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


BROWSER = find_browser()
needs_browser = pytest.mark.skipif(
    BROWSER is None,
    reason="no chromium found (scripts/system-deps.sh installs Debian's `chromium`)",
)


async def run_browser(profile: Path, *args: str) -> bytes:
    assert BROWSER is not None
    proc = await asyncio.create_subprocess_exec(
        BROWSER,
        "--headless",
        "--no-sandbox",  # root in CI containers; the page is our own, on loopback
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=90)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out


class Cells(HTMLParser):
    """Collects ``data-field`` cells of rows marked ``data-tier`` (and ``data-op``), and ids."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[tuple[str, str], dict[str, str]] = {}
        self.ids: dict[str, str] = {}
        self.body: dict[str, str | None] = {}
        self._row: tuple[str, str] | None = None
        self._field: str | None = None
        self._id: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if tag == "tr" and a.get("data-tier"):
            self._row = (a["data-tier"] or "", a.get("data-op") or "")
            self.rows[self._row] = {}
        elif tag == "td" and self._row is not None and a.get("data-field"):
            field = self._field = a["data-field"] or ""
            self.rows[self._row][field] = ""
            if a.get("data-value") is not None:
                self.rows[self._row][field + ".value"] = a["data-value"] or ""
        elif a.get("id"):
            ident = self._id = a["id"] or ""
            self.ids[ident] = ""

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._field = None
        elif tag == "tr":
            self._row = None
        if self._id is not None and tag in ("div", "span"):
            self._id = None

    def handle_data(self, data: str) -> None:
        if self._row is not None and self._field is not None:
            self.rows[self._row][self._field] += data
        elif self._id is not None:
            self.ids[self._id] += data


async def exercise(served: Served) -> dict[str, object]:
    async with aiohttp.ClientSession() as session:
        for i in range(8):
            key = f"blk{i}"
            async with session.put(f"{served.url}/v1/blocks/{key}", data=payload(key, BLOCK)) as r:
                assert r.status == 201
        for key in ["blk7", "blk7", "blk5", "blk0", "absent-1", "absent-2"]:
            async with session.get(f"{served.url}/v1/blocks/{key}") as r:
                assert r.status in (200, 404)
        await quiesce(served)
        async with session.get(f"{served.url}/v1/stats") as r:
            stats: dict[str, object] = await r.json()
        return stats


@needs_browser
async def test_dashboard_renders_live_numbers(tmp_path: Path) -> None:
    telemetry = Telemetry(
        TelemetryConfig(), span_processors=[SimpleSpanProcessor(InMemorySpanExporter())]
    )
    async with serve(build_app(telemetry, tmp_path)) as served:
        stats = await exercise(served)
        url = f"{served.url}/dashboard#interval=250"
        dom = await run_browser(
            tmp_path / "profile-dom", "--virtual-time-budget=4000", "--dump-dom", url
        )
        shot = tmp_path / "dashboard.png"
        await run_browser(
            tmp_path / "profile-shot",
            "--virtual-time-budget=4000",
            "--window-size=1280,900",
            f"--screenshot={shot}",
            url,
        )
    page = Cells()
    page.feed(dom.decode())
    assert page.body.get("data-ready") == "1", "the page never rendered a poll"
    tiers = stats["tiers"]
    assert isinstance(tiers, list) and [t["name"] for t in tiers] == ["hbm", "dram", "disk"]
    for tier in tiers:
        row = page.rows[(tier["name"], "")]
        assert row["blocks"] == str(tier["blocks"])
        assert row["used.value"] == str(tier["used_bytes"])
        assert row["device"] == tier["device"]
        occupancy = float(row["occupancy.value"])
        assert occupancy == pytest.approx(tier["used_bytes"] / tier["capacity_bytes"], abs=1e-4)
    assert page.rows[("hbm", "")]["hits"] == "2"  # blk7 twice
    # Six reads, four served: the overall ratio is rendered as a percentage.
    assert page.ids["reads-total"] == "6"
    assert page.ids["hit-ratio"] == "66.7%"
    # Latency rows for every tier and op; hbm served reads, so its percentiles are numbers.
    for name in ("hbm", "dram", "disk"):
        for op in ("get", "put"):
            assert (name, op) in page.rows
    hbm_get = page.rows[("hbm", "get")]
    assert hbm_get["count"] == "2"
    assert float(hbm_get["p50_ms"]) > 0 and float(hbm_get["p99_ms"]) >= float(hbm_get["p50_ms"])
    # The chart drew a line for the cumulative ratio.
    assert 'data-series="cumulative"' in dom.decode() and 'd="M' in dom.decode()
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


async def test_dashboard_is_served_self_contained(tmp_path: Path) -> None:
    telemetry = Telemetry(TelemetryConfig())
    async with (
        serve(build_app(telemetry, tmp_path)) as served,
        aiohttp.ClientSession() as session,
        session.get(f"{served.url}/dashboard") as resp,
    ):
        assert resp.status == 200
        assert resp.content_type == "text/html"
        html = await resp.text()
    assert "/v1/metrics/summary" in html and "/v1/stats" in html
    # No build step, no CDN: nothing is loaded from anywhere else.
    assert "http://" not in html.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in html and "<script src" not in html and "<link" not in html


@needs_browser
async def test_the_metrics_token_shows_the_operator_the_totals(tmp_path: Path) -> None:
    # With tenants, a tenant's token shows its own figures; the operator opens the dashboard
    # with the metrics token, which /v1/stats refuses: the page draws the totals from the
    # summary alone.
    tenants = tuple(
        TenantConfig(n, hashlib.sha256(f"{n}-token".encode()).hexdigest()) for n in ("a", "b")
    )
    digest = hashlib.sha256(b"ops-token").hexdigest()
    async with running_gateway(
        tmp_path / "data", tenants=tenants, metrics_token_sha256=digest
    ) as gw:
        for name, count in (("a", 3), ("b", 2)):
            async with KVGateClient(gw.url, token=f"{name}-token") as client:
                for i in range(count):
                    assert await client.put(f"k{i}", payload(f"{name}{i}", BLOCK)) is True
                    assert await client.get(f"k{i}") is not None
        await gw.hierarchy.quiesce()
        totals = gw.hierarchy.stats()
        pages = {}
        for token in ("ops-token", "b-token"):
            dom = await run_browser(
                tmp_path / f"profile-{token}",
                "--virtual-time-budget=4000",
                "--dump-dom",
                f"{gw.url}/dashboard#interval=250&token={token}",
            )
            pages[token] = page = Cells()
            page.feed(dom.decode())
            assert page.body.get("data-ready") == "1", f"no poll rendered with {token}"
    ops, bob = pages["ops-token"], pages["b-token"]
    assert sum(int(ops.rows[(t.name, "")]["blocks"]) for t in totals) == 5
    for t in totals:
        assert ops.rows[(t.name, "")]["blocks"] == str(t.blocks)
    assert ops.ids["reads-total"] == "5"
    assert sum(int(bob.rows[(t.name, "")]["blocks"]) for t in totals) == 2
    assert bob.ids["reads-total"] == "2"
