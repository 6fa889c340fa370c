"""Gateway configuration: embedded defaults, then a TOML file, then ``KVGATE_*``, then flags.

Every layer is validated the same way (:func:`build_config`), so a bad size in the TOML file and
a bad ``--hbm-bytes`` flag fail with the same clear :class:`ConfigError` (the CLI turns it into
exit code 2 without a traceback).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tiers.policy import DEFAULT_POLICY

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

ENV_PREFIX = "KVGATE_"

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": KiB,
    "kb": 1000,
    "kib": KiB,
    "m": MiB,
    "mb": 1000**2,
    "mib": MiB,
    "g": GiB,
    "gb": 1000**3,
    "gib": GiB,
    "t": 1024 * GiB,
    "tb": 1000**4,
    "tib": 1024 * GiB,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_TENANT_RE = re.compile(r"^[A-Za-z0-9._:@-]{1,64}$")


class ConfigError(ValueError):
    """The configuration is unusable; the message says which setting and why."""


def parse_size(value: object, *, name: str = "size") -> int:
    """Bytes from ``64MiB``, ``2GiB``, ``512KiB``, ``1GB``, ``1.5GiB`` or a plain integer."""
    if isinstance(value, bool):
        raise ConfigError(f"{name}: expected a size such as 64MiB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{name}: a size cannot be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"{name}: expected a size such as 64MiB, got {value!r}")
    match = _SIZE_RE.match(value)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise ConfigError(
            f"{name}: cannot read {value!r} as a size (use e.g. 64MiB, 2GiB, 512KiB, 1GB or bytes)"
        )
    number = float(match.group(1))
    nbytes = number * _SIZE_UNITS[unit]
    if not math.isfinite(nbytes) or nbytes != int(nbytes):
        raise ConfigError(f"{name}: {value!r} is not a whole number of bytes")
    return int(nbytes)


def format_size(nbytes: int) -> str:
    for unit, scale in (("TiB", 1024 * GiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


@dataclass(frozen=True, slots=True)
class TenantConfig:
    """One tenant (``[tenants.NAME]``); auth and quotas are enforced from issue 3 on."""

    name: str
    token_sha256: str
    quota_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = Path("data")
    hbm_bytes: int = 512 * MiB
    dram_bytes: int = 2 * GiB
    disk_bytes: int = 8 * GiB
    """0: no disk tier, a RAM-only cache (blocks evicted from dram are gone, nothing survives
    a restart but the fencing epoch, kept in a small file in ``data_dir``)."""
    max_block_bytes: int = 64 * MiB
    max_batch_bytes: int = 256 * MiB
    max_batch_keys: int = 4096
    page_bytes: int = 64 * KiB
    hbm_policy: str = DEFAULT_POLICY
    dram_policy: str = DEFAULT_POLICY
    disk_policy: str = DEFAULT_POLICY
    write_through: bool = False
    disk_compression_level: int = 1  # measured best on real bf16 KV (docs/benchmarks.md)
    remote: str | None = None
    """``redis://HOST:PORT``: the shared remote tier, and the leases, in that Redis."""
    remote_bytes: int = 4 * GiB
    """The shared remote tier's budget (frame bytes), one for all gateways sharing it."""
    remote_prefix: str = "kvgate"
    """Prefix of every Redis key: gateways with the same prefix are one cache."""
    remote_inclusive: bool = False
    """A block the shared tier evicts leaves every gateway's local tiers too: one version of
    each key across the fleet, at the price of local tiers that hold no more than
    ``remote_bytes``. Off: local copies stay, and another gateway may store other bytes under
    the key once Redis has forgotten it (docs/remote.md)."""
    shutdown_timeout_s: float = 10.0
    log_level: str = "INFO"
    disk_shed: bool = False
    """When every background demotion to disk is busy, drop the victim instead of making the
    writer wait. Off by default: a block acknowledged with 201 should reach disk while the disk
    has room; turn it on to trade that for PUT throughput under sustained write overload."""
    prefault: bool = True
    """Page the host arenas in from a background thread at start, so the first fill of the
    memory tiers does not pay a page fault per 4 KiB written (tiers.arena); ``false`` leaves
    them to be paged in by their first writes (and the memory uncommitted until then)."""
    land_puts: bool = True
    """Receive the body of a plain ``PUT /v1/blocks/...`` straight into a buffer instead of
    through aiohttp's body stream (gateway.landing); ``false`` sends every byte through aiohttp."""
    landing_bytes: int = 64 * MiB
    """Pages beyond the budget of the first CPU arena (hbm without a GPU, dram with one) that
    landed PUT bodies are received into and then stored from without a copy (tiers.base.
    Reservation); 0, or ``land_puts = false``, copies every body in from a buffer."""
    shm: bool = True
    """Same-host data plane: CPU arenas in shared memory under ``shm_dir`` + /v1/shm/*."""
    shm_dir: str = "/dev/shm"
    shm_staging_bytes: int = 64 * MiB
    """Per attached client: the segment it writes PUTs into and reads non-arena blocks from."""
    shm_isolation: str = "auto"
    """``shared``: sessions map the arenas, which hold every tenant's pages (one trust domain,
    the fastest read). ``private``: each session gets only a nameless staging segment, handed
    over as a descriptor, and reads are copied into it. ``auto``: private when tenants are
    configured, shared otherwise."""
    shm_lease_ms: int = 5_000
    """How long a shared-memory read stays pinned unless released first (the longest allowed is
    six times this)."""
    metrics_token_sha256: str | None = None
    """Hex SHA-256 of a bearer token that ``GET /metrics`` then requires. Unset, ``/metrics`` is
    open, as Prometheus endpoints usually are; set it where the scrape port is reachable by
    tenants, since the metrics carry every tenant's name and usage."""
    tenants: tuple[TenantConfig, ...] = field(default=())

    @property
    def auth_enabled(self) -> bool:
        return bool(self.tenants)

    @property
    def shm_private(self) -> bool:
        """Whether shared-memory sessions are private (see ``shm_isolation``)."""
        if self.shm_isolation == "auto":
            return self.auth_enabled
        return self.shm_isolation == "private"


_SIZE_FIELDS = frozenset(
    {
        "hbm_bytes",
        "dram_bytes",
        "disk_bytes",
        "max_block_bytes",
        "max_batch_bytes",
        "page_bytes",
        "shm_staging_bytes",
        "remote_bytes",
        "landing_bytes",
    }
)
_INT_FIELDS = frozenset({"port", "max_batch_keys", "disk_compression_level", "shm_lease_ms"})
_FLOAT_FIELDS = frozenset({"shutdown_timeout_s"})
_BOOL_FIELDS = frozenset(
    {"write_through", "shm", "disk_shed", "land_puts", "prefault", "remote_inclusive"}
)
_STR_FIELDS = frozenset(
    {
        "host",
        "hbm_policy",
        "dram_policy",
        "disk_policy",
        "log_level",
        "shm_dir",
        "shm_isolation",
        "remote_prefix",
    }
)
SETTABLE_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(GatewayConfig) if f.name != "tenants"
)
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _coerce(name: str, value: object) -> object:
    """One raw value (TOML value, env string or flag string) to the field's type."""
    if name in _SIZE_FIELDS:
        return parse_size(value, name=name)
    if name in _BOOL_FIELDS:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    if name in _INT_FIELDS:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
            return int(value)
        raise ConfigError(f"{name}: expected an integer, got {value!r}")
    if name in _FLOAT_FIELDS:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    if name == "data_dir":
        if isinstance(value, str | Path) and str(value).strip():
            return Path(value)
        raise ConfigError(f"data_dir: expected a directory path, got {value!r}")
    if name == "remote":
        if value is None:
            return value
        if isinstance(value, str) and re.fullmatch(r"(redis|rediss|unix)://\S+", value.strip()):
            return value.strip()
        raise ConfigError(f"remote: expected a redis://HOST:PORT URL, got {value!r}")
    if name == "metrics_token_sha256":
        if isinstance(value, str) and _SHA256_RE.match(value.strip().lower()):
            return value.strip().lower()
        raise ConfigError(f"{name}: expected the SHA-256 hex of the token, got {value!r:.20}")
    if name in _STR_FIELDS:
        if isinstance(value, str) and value.strip():
            return value.strip()
        raise ConfigError(f"{name}: expected a non-empty string, got {value!r}")
    raise ConfigError(f"unknown setting {name!r}")  # pragma: no cover - guarded by callers


def _parse_tenants(raw: object) -> tuple[TenantConfig, ...]:
    if not isinstance(raw, Mapping):
        raise ConfigError("tenants: expected [tenants.NAME] tables")
    tenants: list[TenantConfig] = []
    for name, table in raw.items():
        where = f"tenants.{name}"
        if not _TENANT_RE.match(str(name)):
            raise ConfigError(f"{where}: tenant names match [A-Za-z0-9._:@-]{{1,64}}")
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table")
        unknown = set(table) - {"token_sha256", "quota_bytes"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
        token = table.get("token_sha256")
        if not isinstance(token, str) or not _SHA256_RE.match(token.lower()):
            raise ConfigError(f"{where}.token_sha256: expected the SHA-256 hex of the token")
        quota_raw = table.get("quota_bytes")
        quota = None if quota_raw is None else parse_size(quota_raw, name=f"{where}.quota_bytes")
        tenants.append(TenantConfig(str(name), token.lower(), quota))
    digests = [t.token_sha256 for t in tenants]
    if len(set(digests)) != len(digests):
        raise ConfigError("tenants: two tenants share one token")
    return tuple(tenants)


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def env_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """``KVGATE_HBM_BYTES=1GiB`` and friends; unknown ``KVGATE_*`` names are an error."""
    out: dict[str, str] = {}
    allowed = set(SETTABLE_FIELDS)
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_PREFIX + "CONFIG":
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in allowed:
            raise ConfigError(f"environment variable {name} is not a kvgate setting")
        out[key] = value
    return out


def build_config(
    *,
    file_values: Mapping[str, Any] | None = None,
    env_values: Mapping[str, str] | None = None,
    flag_values: Mapping[str, object] | None = None,
) -> GatewayConfig:
    """Merge the layers (later wins) over the defaults and validate the result."""
    values: dict[str, object] = {}
    tenants: tuple[TenantConfig, ...] = ()
    for layer_name, layer in (
        ("config file", file_values),
        ("environment", env_values),
        ("flags", flag_values),
    ):
        for key, raw in (layer or {}).items():
            if layer_name == "config file" and key == "tenants":
                tenants = _parse_tenants(raw)
                continue
            if key not in SETTABLE_FIELDS:
                raise ConfigError(
                    f"{layer_name}: unknown setting {key!r} (known: {', '.join(SETTABLE_FIELDS)})"
                )
            if raw is None:
                continue
            values[key] = _coerce(key, raw)
    config = GatewayConfig(tenants=tenants, **values)  # type: ignore[arg-type]
    validate(config)
    return config


SHM_ISOLATION = ("auto", "shared", "private")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def validate(config: GatewayConfig) -> None:
    if config.tenants == () and not is_loopback(config.host):
        raise ConfigError(
            f"host: binding to {config.host} without tenants would serve everyone without auth; "
            "bind to 127.0.0.1 or configure [tenants.NAME] in the config file"
        )
    if not 0 <= config.port <= 65535:
        raise ConfigError(f"port: expected 0..65535, got {config.port}")
    if config.page_bytes < 512 or config.page_bytes & (config.page_bytes - 1):
        raise ConfigError(f"page_bytes: expected a power of two >= 512, got {config.page_bytes}")
    if config.max_block_bytes < 1:
        raise ConfigError("max_block_bytes: must be at least 1 byte")
    if config.max_batch_bytes < config.max_block_bytes:
        raise ConfigError("max_batch_bytes: must be at least max_block_bytes")
    if config.max_batch_keys < 1:
        raise ConfigError("max_batch_keys: must be at least 1")
    if config.shm_isolation not in SHM_ISOLATION:
        raise ConfigError(
            f"shm_isolation: expected one of {', '.join(SHM_ISOLATION)}, "
            f"got {config.shm_isolation!r}"
        )
    if not 1 <= config.shm_lease_ms <= 600_000:
        raise ConfigError("shm_lease_ms: expected 1..600000 milliseconds")
    if config.shm_staging_bytes < config.page_bytes:
        raise ConfigError(
            f"shm_staging_bytes ({config.shm_staging_bytes}) must hold at least one page "
            f"(page_bytes = {config.page_bytes}); raise shm_staging_bytes or lower page_bytes"
        )
    from tiers.disk import MIN_CAPACITY_BYTES

    if config.disk_bytes != 0 and config.disk_bytes < MIN_CAPACITY_BYTES:
        raise ConfigError(
            f"disk_bytes: the disk tier needs at least {MIN_CAPACITY_BYTES} bytes (1MiB), "
            f"got {config.disk_bytes} (0: no disk tier)"
        )
    if config.disk_bytes == 0 and config.write_through:
        raise ConfigError("write_through writes every block to the disk tier: disk_bytes is 0")
    if not 1 <= config.disk_compression_level <= 22:
        raise ConfigError("disk_compression_level: expected 1..22 (zstd levels)")
    if config.shutdown_timeout_s < 0:
        raise ConfigError("shutdown_timeout_s: cannot be negative")
    if config.log_level.upper() not in _LOG_LEVELS:
        raise ConfigError(f"log_level: expected one of {', '.join(_LOG_LEVELS)}")
    from tiers.policy import policy_names

    known = policy_names()
    for tier in ("hbm", "dram", "disk"):
        policy = getattr(config, f"{tier}_policy")
        if policy not in known:
            raise ConfigError(f"{tier}_policy: unknown policy {policy!r} (known: {known})")


def load_config(
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
) -> GatewayConfig:
    """The defaults, overridden by ``config_file``, then ``KVGATE_*`` in ``environ``, then flags.

    ``KVGATE_CONFIG`` names the config file when ``config_file`` is not given.
    """
    env = dict(environ or {})
    if config_file is None and env.get(ENV_PREFIX + "CONFIG"):
        config_file = Path(env[ENV_PREFIX + "CONFIG"])
    file_values = read_toml(config_file) if config_file is not None else None
    return build_config(
        file_values=file_values, env_values=env_overrides(env), flag_values=flags or {}
    )
