"""config/crawler.service: the settings the service relies on, and systemd's own checks.

The settings are read with a small parser (systemd repeats keys, which
configparser can't keep) so these run anywhere. `systemd-analyze verify` and
`systemd-analyze security --offline=yes` run when systemd-analyze is on PATH
(`.ci/install-systemd-analyze` installs it); without it those tests skip.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "config" / "crawler.service"
CONFIG = ROOT / "config" / "crawler.toml"
MAX_EXPOSURE = 3.0
INSTALLED_PYTHON = "/opt/crawler/.venv/bin/python"

# section -> key -> every value assigned, in order (systemd keys may repeat).
UnitFile = dict[str, dict[str, list[str]]]


def parse_unit(text: str) -> UnitFile:
    """Sections, keys and values of a unit file: comments, blank lines and
    backslash continuations handled the way systemd does for these files."""
    sections: UnitFile = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped[0] in "#;"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        line, pending = pending + stripped, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside any section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    assert not pending, "unit ends inside a continued line"
    return sections


def timespan_seconds(value: str) -> float:
    """A systemd time span ("40", "40s", "1min 30s", "500ms") in seconds."""
    units = {"": 1.0, "s": 1.0, "sec": 1.0, "ms": 0.001, "m": 60.0, "min": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts, f"not a time span: {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def is_true(value: str) -> bool:
    return value.lower() in {"1", "yes", "true", "on"}


@pytest.fixture(scope="module")
def unit() -> UnitFile:
    return parse_unit(UNIT.read_text(encoding="utf-8"))


def only(unit: UnitFile, section: str, key: str) -> str:
    values = unit.get(section, {}).get(key)
    assert values, f"[{section}] {key}= is missing"
    assert len(values) == 1, f"[{section}] {key}= is set {len(values)} times: {values}"
    return values[0]


def test_unit_has_unit_service_and_install_sections(unit: UnitFile) -> None:
    assert list(unit) == ["Unit", "Service", "Install"]


def test_unit_describes_itself_and_waits_for_the_network(unit: UnitFile) -> None:
    assert only(unit, "Unit", "Description")
    assert only(unit, "Unit", "Documentation")
    # After= alone orders against a target nothing pulls in; Wants= pulls it in.
    assert "network-online.target" in only(unit, "Unit", "After").split()
    assert "network-online.target" in only(unit, "Unit", "Wants").split()


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("Type", "notify"),
        ("NotifyAccess", "main"),
        ("Restart", "on-failure"),
        ("WatchdogSec", "30"),
        ("KillMode", "mixed"),
        ("KillSignal", "SIGTERM"),
        ("TimeoutStopSec", "40"),
        ("StateDirectory", "crawler"),
        ("StateDirectoryMode", "0700"),
        ("UMask", "0077"),
        ("ProtectSystem", "strict"),
        ("ProtectProc", "invisible"),
        ("ProcSubset", "pid"),
        ("DevicePolicy", "closed"),
        ("SystemCallArchitectures", "native"),
        # An unexpected call fails with EPERM instead of killing the process:
        # OpenBLAS calls mbind() (in @resources) and ignores the error.
        ("SystemCallErrorNumber", "EPERM"),
        # The pool replaces an OOM-killed worker: that must not stop the service.
        ("OOMPolicy", "continue"),
        # No capabilities at all, in the bounding set or ambient.
        ("CapabilityBoundingSet", ""),
        ("AmbientCapabilities", ""),
    ],
)
def test_service_setting(unit: UnitFile, key: str, expected: str) -> None:
    assert only(unit, "Service", key) == expected


@pytest.mark.parametrize(
    "key",
    [
        "DynamicUser",
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "PrivateUsers",
        "PrivateMounts",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "RestrictNamespaces",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "LockPersonality",
        "MemoryDenyWriteExecute",
        "RemoveIPC",
    ],
)
def test_service_hardening_switch_is_on(unit: UnitFile, key: str) -> None:
    assert is_true(only(unit, "Service", key)), f"{key}= must be on"


def test_exec_start_serves_with_the_installed_config(unit: UnitFile) -> None:
    assert only(unit, "Service", "ExecStart").split() == [
        INSTALLED_PYTHON,
        "-m",
        "crawler",
        "serve",
        "--config",
        "/etc/crawler/crawler.toml",
    ]


def test_restart_delay_and_memory_cap_are_set(unit: UnitFile) -> None:
    assert timespan_seconds(only(unit, "Service", "RestartSec")) > 0
    assert re.fullmatch(r"\d+(?:[KMGT]|%)?", only(unit, "Service", "MemoryMax"))


def test_environment_is_unbuffered(unit: UnitFile) -> None:
    assignments = [a for line in unit["Service"].get("Environment", []) for a in line.split()]
    assert "PYTHONUNBUFFERED=1" in assignments


def test_address_families_are_inet_inet6_and_unix(unit: UnitFile) -> None:
    families = only(unit, "Service", "RestrictAddressFamilies").split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]


def test_syscall_filter_is_system_service_without_privileged_or_resources(
    unit: UnitFile,
) -> None:
    filters = unit["Service"].get("SystemCallFilter", [])
    assert filters[0] == "@system-service"  # the first entry makes it an allow list
    denied = {group for f in filters[1:] if f.startswith("~") for group in f[1:].split()}
    assert {"@privileged", "@resources"} <= denied


def test_stop_timeout_outlasts_the_drain(unit: UnitFile) -> None:
    """SIGKILL must not cut the SIGTERM drain (crawl.grace_period) short."""
    with CONFIG.open("rb") as f:
        grace = float(tomllib.load(f)["crawl"]["grace_period"])
    stop = timespan_seconds(only(unit, "Service", "TimeoutStopSec"))
    assert stop >= grace + 10, f"TimeoutStopSec={stop}s leaves no margin over the {grace}s drain"


def test_watchdog_leaves_room_for_a_missed_ping(unit: UnitFile) -> None:
    # The service pings every WatchdogSec/2; a few seconds is too tight for a busy loop.
    assert timespan_seconds(only(unit, "Service", "WatchdogSec")) >= 10


def test_egress_is_not_filtered_by_address(unit: UnitFile) -> None:
    """The crawl must reach any address it is given: no IP allow/deny lists, no private network."""
    service = unit["Service"]
    for key in ("IPAddressDeny", "IPAddressAllow", "PrivateNetwork"):
        assert key not in service, f"{key}= would stop the crawl reaching some hosts"


def test_installs_into_multi_user_target(unit: UnitFile) -> None:
    assert only(unit, "Install", "WantedBy") == "multi-user.target"


# --- systemd's own checks ---------------------------------------------------


@pytest.fixture(scope="module")
def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip(
            "systemd-analyze is not on PATH (Debian package 'systemd'; "
            ".ci/install-systemd-analyze installs it)"
        )
    return path


def run_analyze(systemd_analyze: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_LEVEL": "info"}
    return subprocess.run(
        [systemd_analyze, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=30,
        check=False,
    )


def systemd_version(systemd_analyze: str) -> int:
    out = run_analyze(systemd_analyze, "--version", cwd=ROOT).stdout
    match = re.match(r"systemd (\d+)", out)
    assert match, f"unexpected `systemd-analyze --version` output: {out!r}"
    return int(match.group(1))


def test_systemd_analyze_verify_prints_nothing(systemd_analyze: str, tmp_path: Path) -> None:
    """`verify` exits 0 even on unknown keys (it only warns), so any output fails."""
    # verify also checks that ExecStart='s binary exists and is executable, and
    # /opt/crawler/.venv is not installed here: the copy runs this interpreter
    # instead. That is the only line changed.
    if re.search(r"\s", sys.executable):
        pytest.skip(f"interpreter path has whitespace, can't stand in ExecStart=: {sys.executable}")
    original = UNIT.read_text(encoding="utf-8").splitlines(keepends=True)
    copy = [
        line.replace(INSTALLED_PYTHON, sys.executable, 1)
        if line.startswith(f"ExecStart={INSTALLED_PYTHON} ")
        else line
        for line in original
    ]
    assert sum(a != b for a, b in zip(original, copy, strict=True)) == 1
    unit_copy = tmp_path / UNIT.name  # the file name is the unit name
    unit_copy.write_text("".join(copy), encoding="utf-8")

    result = run_analyze(systemd_analyze, "verify", str(unit_copy), cwd=tmp_path)

    assert (result.returncode, result.stdout + result.stderr) == (0, ""), (
        f"systemd-analyze verify exited {result.returncode}:\n{result.stdout}{result.stderr}"
    )


def test_systemd_analyze_security_exposure_at_most_3(systemd_analyze: str) -> None:
    # --offline=yes (systemd 250+) assesses the file itself, with no running manager.
    version = systemd_version(systemd_analyze)
    if version < 250:
        pytest.skip(f"systemd {version} has no `security --offline=` (needs 250+)")
    result = run_analyze(
        systemd_analyze, "security", "--offline=yes", "--no-pager", str(UNIT), cwd=ROOT
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"systemd-analyze security exited {result.returncode}:\n{output}"
    match = re.search(r"Overall exposure level for crawler\.service: (\d+(?:\.\d+)?)", output)
    assert match, f"no overall exposure level in:\n{output}"
    exposure = float(match.group(1))
    assert exposure <= MAX_EXPOSURE, f"exposure {exposure} > {MAX_EXPOSURE}:\n{output}"
