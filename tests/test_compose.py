"""The compose stack is valid as docker-compose reads it (no Docker engine needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose_config() -> str:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose not installed (scripts/system-deps.sh installs it)")
    done = subprocess.run(
        [exe, "-f", str(ROOT / "compose.yaml"), "config"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_compose_has_the_operator_topology(compose_config: str) -> None:
    for service in ("kvgate:", "otel-collector:", "prometheus:", "redis:"):
        assert service in compose_config
    assert "OTEL_EXPORTER_OTLP_ENDPOINT: http://otel-collector:4318" in compose_config


def test_compose_gateways_share_the_remote_tier(compose_config: str) -> None:
    # Two gateways, one cache: both point at the compose Redis for blocks and leases.
    assert "kvgate-b:" in compose_config
    assert compose_config.count("KVGATE_REMOTE: redis://redis:6379/0") == 2
    assert "noeviction" in compose_config


def test_compose_mounts_existing_files(compose_config: str) -> None:
    for rel in ("deploy/kvgate.toml", "deploy/otel-collector.yaml", "deploy/prometheus.yml"):
        assert (ROOT / rel).is_file(), rel
        assert rel.split("/")[-1] in compose_config
