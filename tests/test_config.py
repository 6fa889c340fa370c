"""Config layering (defaults < TOML < KVGATE_* < flags), size parsing, errors, and the CLI."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import (
    ConfigError,
    GatewayConfig,
    GiB,
    KiB,
    MiB,
    load_config,
    parse_size,
)

SHA = "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("64MiB", 64 * MiB),
        ("2GiB", 2 * GiB),
        ("512KiB", 512 * KiB),
        ("1GB", 1_000_000_000),
        ("1048576", 1_048_576),
        (" 3 mib ", 3 * MiB),
        ("1.5GiB", 3 * GiB // 2),
        ("10b", 10),
        ("4k", 4096),
        (4096, 4096),
        ("0", 0),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "MiB", "-1", "12XB", "1.1B", "lots", "1e9", True, 2.5, -5])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ConfigError, match="hbm_bytes"):
        parse_size(bad, name="hbm_bytes")


def test_defaults_are_the_embedded_ones() -> None:
    config = load_config(environ={})
    assert (config.host, config.port, config.data_dir) == ("127.0.0.1", 8080, Path("data"))
    assert (config.hbm_bytes, config.dram_bytes, config.disk_bytes) == (512 * MiB, 2 * GiB, 8 * GiB)
    assert config.tenants == () and not config.auth_enabled
    assert config == GatewayConfig()


def test_flags_beat_env_beat_file(tmp_path: Path) -> None:
    path = tmp_path / "kvgate.toml"
    path.write_text(
        'host = "127.0.0.2"\nport = 9000\nhbm_bytes = "1GiB"\ndram_bytes = 1048576\n'
        'data_dir = "/srv/kv"\nwrite_through = true\n'
    )
    env = {"KVGATE_PORT": "9100", "KVGATE_HBM_BYTES": "256MiB", "PATH": "/bin"}
    flags: dict[str, object] = {"hbm_bytes": "64MiB", "host": None}
    config = load_config(config_file=path, environ=env, flags=flags)
    assert config.host == "127.0.0.2"  # file (flag left unset)
    assert config.port == 9100  # env over file
    assert config.hbm_bytes == 64 * MiB  # flag over env over file
    assert config.dram_bytes == MiB
    assert config.data_dir == Path("/srv/kv")
    assert config.write_through is True
    assert config.disk_bytes == 8 * GiB  # default


def test_kvgate_config_env_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("port = 1234\n")
    assert load_config(environ={"KVGATE_CONFIG": str(path)}).port == 1234


def test_tenants_table(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(
        f'[tenants.alice]\ntoken_sha256 = "{SHA}"\nquota_bytes = 1073741824\n'
        f'[tenants.bob]\ntoken_sha256 = "{"CD" * 32}"\n'
    )
    config = load_config(config_file=path, environ={})
    assert [(t.name, t.token_sha256, t.quota_bytes) for t in config.tenants] == [
        ("alice", SHA, GiB),
        ("bob", "cd" * 32, None),
    ]
    assert config.auth_enabled


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("port = 70000\n", "port"),
        ('port = "eighty"\n', "port"),
        ('hbm_bytes = "huge"\n', "hbm_bytes"),
        ("colour = 1\n", "unknown setting 'colour'"),
        ("page_bytes = 1000\n", "page_bytes"),
        ('hbm_policy = "nope"\n', "unknown policy"),
        ("write_through = 3\n", "write_through"),
        ("max_block_bytes = 0\n", "max_block_bytes"),
        ("disk_compression_level = 99\n", "disk_compression_level"),
        ("disk_bytes = 4096\n", "at least"),
        ("disk_bytes = 0\nwrite_through = true\n", "disk_bytes is 0"),
        ('[tenants.alice]\ntoken_sha256 = "short"\n', "tenants.alice.token_sha256"),
        (f'[tenants.alice]\ntoken_sha256 = "{SHA}"\nextra = 1\n', "unknown keys"),
        (
            f'[tenants.a]\ntoken_sha256 = "{SHA}"\n[tenants.b]\ntoken_sha256 = "{SHA}"\n',
            "share one token",
        ),
        ("port = \n", "not valid TOML"),
        ('metrics_token_sha256 = "abc"\n', "metrics_token_sha256"),
    ],
)
def test_bad_files_fail_clearly(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_config(config_file=path, environ={})


def test_beyond_loopback_needs_tenants(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "10.1.2.3", "example.org", "::"):
        with pytest.raises(ConfigError, match="without tenants"):
            load_config(environ={}, flags={"host": host})
    for host in ("localhost", "127.0.0.1", "::1", "[::1]"):
        assert load_config(environ={}, flags={"host": host}).host == host
    path = tmp_path / "t.toml"
    path.write_text(f'[tenants.alice]\ntoken_sha256 = "{SHA}"\n')
    assert load_config(config_file=path, environ={}, flags={"host": "0.0.0.0"}).auth_enabled


def test_missing_file_and_unknown_env() -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(config_file=Path("/nonexistent/kvgate.toml"), environ={})
    with pytest.raises(ConfigError, match="KVGATE_HBM_BYTE "):
        load_config(environ={"KVGATE_HBM_BYTE": "1GiB"})


def test_cli_bad_config_exits_2_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--hbm-bytes", "lots"]) == 2
    err = capsys.readouterr().err
    assert "hbm_bytes" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--disk-bytes", "1KiB"], "disk_bytes"),
        (["--page-bytes", "1GiB"], "page_bytes"),
    ],
)
def test_cli_sizes_no_tier_can_take_exit_2_naming_the_flag(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, flags: list[str], named: str
) -> None:
    # A budget the tier refuses is the operator's configuration, not a runtime failure (exit 1).
    argv = ["serve", "--port", "0", "--data-dir", str(tmp_path), "--no-shm", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "bad configuration" in err and named in err and "Traceback" not in err


def test_cli_remote_unreachable_fails_startup_cleanly(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from loadtest.procs import free_port

    url = f"redis://127.0.0.1:{free_port()}"  # nothing listens there
    argv = ["serve", "--remote", url, "--port", "0", "--data-dir", str(tmp_path), "--no-shm"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "cannot reach the remote tier" in err and "Traceback" not in err


def test_cli_remote_must_be_a_redis_url(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--remote", "http://example"]) == 2
    assert "remote" in capsys.readouterr().err


def test_cli_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["serve", "--no-such-flag"]) == 2
    assert main(["serve", "--help"]) == 0
    assert "--hbm-bytes" in capsys.readouterr().out


def test_cli_replay_forwards_its_arguments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("loadtest.replay")

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 3

    fake.main = fake_main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "loadtest.replay", fake)
    assert main(["replay", "--trace", "t.jsonl", "--simulate", "--help"]) == 3
    assert seen == [["--trace", "t.jsonl", "--simulate", "--help"]]


def test_cli_replay_without_the_module_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "loadtest.replay", None)
    assert main(["replay", "--trace", "x"]) == 2
    assert "loadtest.replay" in capsys.readouterr().err
