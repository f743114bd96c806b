"""install.sh and uninstall.sh into a temporary DESTDIR, and the configuration template.

The scripts run for real: a virtual environment is created and pip installs
the project into it. To keep the run short, pip installs with --no-deps (the
layout, not the dependencies, is under test). The installer runs from a copy
of the checkout, so that a test can plant an old build/ folder in it and
compare its files before and after. The setuptools that pip's isolated build
needs comes from the configured package index.

The checks that run only without DESTDIR (the interpreter check, the steps
without a running systemd) are tested by sourcing install.sh, which then only
defines its functions, and calling them with DESTDIR still set, so that
nothing can be installed into the real /opt or /etc.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "systemd" / "config.toml"
INSTALL_SCRIPT = REPO / "systemd" / "install.sh"
INSTALL_TIMEOUT = 100  # seconds, for venv creation and one pip build on a loaded machine
HOST_COMMANDS = ("systemctl", "systemd-sysusers", "systemd-tmpfiles", "udevadm")


@dataclass(frozen=True)
class Installation:
    root: Path
    source: Path
    output: str
    host_command_log: Path
    # Relative paths of the files and folders of the source, before and after the install.
    source_paths_before: list[str]
    source_paths_after: list[str]


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for directory in ("daemon", "drivers", "sync", "systemd", "docs"):
        if (REPO / directory).is_dir():
            shutil.copytree(REPO / directory, source / directory, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, source / name)
    return source


def write_fake_host_tools(bin_dir: Path) -> tuple[Path, Path]:
    """Write systemctl, udevadm, ... that only log their call; return bin_dir and the log."""
    bin_dir.mkdir(exist_ok=True)
    log = bin_dir / "calls.log"
    for command in HOST_COMMANDS:
        script = bin_dir / command
        script.write_text(f'#!/bin/sh\necho "{command} $*" >> "{log}"\n')
        script.chmod(0o755)
    return bin_dir, log


@pytest.fixture(scope="module")
def fake_host_tools(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_fake_host_tools(tmp_path_factory.mktemp("bin"))


def run_script(
    script: Path,
    root: Path,
    fake_host_tools: tuple[Path, Path],
    *arguments: str,
    python: str = sys.executable,
) -> subprocess.CompletedProcess[str]:
    bin_dir, _ = fake_host_tools
    environment = {
        **os.environ,
        "DESTDIR": str(root),
        "PYTHON": python,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    return subprocess.run(
        ["bash", str(script), *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        check=False,
    )


STALE_MODULE = "stale_module_from_old_build.py"
LOCAL_RULES = "etc/udev/rules.d/98-identity-connector-local.rules"
VENV = "opt/identity-connector/venv"


def relative_paths(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.fixture(scope="module")
def installation(
    tmp_path_factory: pytest.TempPathFactory,
    source_copy: Path,
    fake_host_tools: tuple[Path, Path],
) -> Installation:
    root = tmp_path_factory.mktemp("root")
    # A build folder left by an earlier install, holding a module that was deleted since.
    stale = source_copy / "build" / "lib" / "daemon" / STALE_MODULE
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_text("raise RuntimeError('deleted upstream')\n", encoding="utf-8")
    source_paths_before = relative_paths(source_copy)

    result = run_script(source_copy / "systemd" / "install.sh", root, fake_host_tools, "--no-deps")

    assert result.returncode == 0, result.stdout + result.stderr
    return Installation(
        root,
        source_copy,
        result.stdout,
        fake_host_tools[1],
        source_paths_before,
        relative_paths(source_copy),
    )


@pytest.fixture
def installed_copy(installation: Installation, tmp_path: Path) -> Path:
    """Return a copy of the installed root that a test may change."""
    root = tmp_path / "root"
    shutil.copytree(installation.root, root, symlinks=True)
    return root


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.mark.parametrize(
    ("path", "mode"),
    [
        ("etc/identity-connector", 0o755),
        ("etc/identity-connector/config.toml", 0o640),
        ("etc/identity-connector/keys", 0o750),
        ("etc/identity-connector/tls", 0o750),
        ("etc/systemd/system/identity-connector.service", 0o644),
        ("etc/sysusers.d/identity-connector.conf", 0o644),
        ("etc/tmpfiles.d/identity-connector.conf", 0o644),
        ("etc/udev/rules.d/99-identity-connector.rules", 0o644),
        ("opt/identity-connector/config.toml.example", 0o644),
        ("opt/identity-connector/uninstall.sh", 0o755),
        ("opt/identity-connector/docs/operations.md", 0o644),
        ("opt/identity-connector/README.md", 0o644),
        ("opt/identity-connector/docs", 0o755),
        ("opt/identity-connector/docs/examples", 0o755),
        ("opt/identity-connector/docs/examples/config.toml", 0o644),
    ],
    ids=lambda value: f"{value:o}" if isinstance(value, int) else value,
)
def test_install_file_mode(installation: Installation, path: str, mode: int) -> None:
    assert file_mode(installation.root / path) == mode


@pytest.mark.parametrize(
    ("installed", "shipped"),
    [
        ("etc/identity-connector/config.toml", "systemd/config.toml"),
        ("opt/identity-connector/config.toml.example", "systemd/config.toml"),
        ("etc/systemd/system/identity-connector.service", "systemd/identity-connector.service"),
        ("etc/sysusers.d/identity-connector.conf", "systemd/sysusers.conf"),
        ("etc/tmpfiles.d/identity-connector.conf", "systemd/tmpfiles.conf"),
        ("etc/udev/rules.d/99-identity-connector.rules", "systemd/99-identity-connector.rules"),
    ],
)
def test_install_copies_file(installation: Installation, installed: str, shipped: str) -> None:
    assert (installation.root / installed).read_bytes() == (REPO / shipped).read_bytes()


def test_install_copies_readme(installation: Installation) -> None:
    installed = installation.root / "opt/identity-connector/README.md"

    assert installed.read_bytes() == (installation.source / "README.md").read_bytes()


def test_install_copies_docs(installation: Installation) -> None:
    shipped = installation.source / "docs"
    installed = installation.root / "opt/identity-connector/docs"

    assert relative_paths(installed) == relative_paths(shipped)
    for path in shipped.rglob("*"):
        if path.is_file():
            copy = installed / path.relative_to(shipped)
            assert copy.read_bytes() == path.read_bytes(), path


def test_install_leaves_source_unchanged(installation: Installation) -> None:
    # No build/ or *.egg-info is added, and the planted build/ folder stays.
    assert installation.source_paths_after == installation.source_paths_before


def test_install_creates_command(installation: Installation) -> None:
    command = installation.root / "opt/identity-connector/venv/bin/identity-connector"

    assert os.access(command, os.X_OK)
    # The console script runs the venv's own interpreter.
    first_line = command.read_text().splitlines()[0]
    assert first_line == f"#!{installation.root}/opt/identity-connector/venv/bin/python"


def test_install_puts_package_in_venv(installation: Installation) -> None:
    venv_lib = installation.root / "opt/identity-connector/venv/lib"

    assert list(venv_lib.glob("python3*/site-packages/daemon/sdnotify.py"))


def test_install_with_destdir_runs_no_host_command(installation: Installation) -> None:
    assert not installation.host_command_log.exists()


@pytest.mark.parametrize(
    "step",
    [
        "systemd-sysusers /etc/sysusers.d/identity-connector.conf",
        "systemctl daemon-reload",
        "systemctl enable --now identity-connector",
        "/etc/identity-connector/keys/",
        "journalctl -u identity-connector",
    ],
)
def test_install_prints_next_step(installation: Installation, step: str) -> None:
    assert step in installation.output


def test_reinstall_keeps_edited_config(
    installation: Installation, installed_copy: Path, fake_host_tools: tuple[Path, Path]
) -> None:
    config = installed_copy / "etc/identity-connector/config.toml"
    edited = config.read_text().replace('ids = ["STORE-001"]', 'ids = ["STORE-042"]')
    config.write_text(edited)
    config.chmod(0o600)
    example = installed_copy / "opt/identity-connector/config.toml.example"
    example.write_text("outdated\n")

    result = run_script(
        installation.source / "systemd" / "install.sh", installed_copy, fake_host_tools, "--no-deps"
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert config.read_text() == edited
    assert file_mode(config) == 0o600
    assert example.read_bytes() == TEMPLATE.read_bytes()
    assert "Keeping existing" in result.stdout
    assert "systemctl restart identity-connector" in result.stdout
    assert "Rebuilding virtual environment" not in result.stdout


def test_reinstall_removes_deleted_doc_page(
    installation: Installation, installed_copy: Path, fake_host_tools: tuple[Path, Path]
) -> None:
    deleted_page = installed_copy / "opt/identity-connector/docs/deleted-upstream.md"
    deleted_page.write_text("# A page that a later release deleted\n")

    result = run_script(
        installation.source / "systemd" / "install.sh", installed_copy, fake_host_tools, "--no-deps"
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert not deleted_page.exists()
    assert (installed_copy / "opt/identity-connector/docs/operations.md").is_file()


def pyvenv_setting(venv: Path, key: str) -> str:
    for line in (venv / "pyvenv.cfg").read_text().splitlines():
        name, _, value = line.partition("=")
        if name.strip() == key:
            return value.strip()
    raise AssertionError(f"{key} is missing from {venv / 'pyvenv.cfg'}")


@pytest.mark.parametrize(
    ("old_setting", "arguments", "reason"),
    [
        (
            ("version", "3.10.13"),
            (),
            "it was created by Python 3.10, and ",
        ),
        (
            ("include-system-site-packages", "false"),
            ("--system-site-packages",),
            "it was created without --system-site-packages",
        ),
    ],
    ids=["older-python", "system-site-packages"],
)
def test_reinstall_rebuilds_mismatched_venv(
    installation: Installation,
    installed_copy: Path,
    fake_host_tools: tuple[Path, Path],
    old_setting: tuple[str, str],
    arguments: tuple[str, ...],
    reason: str,
) -> None:
    venv = installed_copy / VENV
    config = venv / "pyvenv.cfg"
    key, old_value = old_setting
    old_text = re.sub(rf"(?m)^{key} = .*$", f"{key} = {old_value}", config.read_text())
    config.write_text(old_text)

    result = run_script(
        installation.source / "systemd" / "install.sh",
        installed_copy,
        fake_host_tools,
        "--no-deps",
        *arguments,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Rebuilding virtual environment {venv}: {reason}" in result.stdout
    assert pyvenv_setting(venv, "version").startswith("{}.{}.".format(*sys.version_info[:2]))
    expected_site_packages = "true" if arguments else "false"
    assert pyvenv_setting(venv, "include-system-site-packages") == expected_site_packages
    assert os.access(venv / "bin/identity-connector", os.X_OK)


def base_interpreter(python: str) -> Path:
    """Return the resolved interpreter that a virtual environment made by python links to."""
    output = subprocess.run(
        [python, "-c", "import sys; print(sys._base_executable)"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return Path(output.strip()).resolve()


def can_create_venvs(python: str) -> bool:
    check = "import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))"
    return subprocess.run([python, "-c", check], capture_output=True, timeout=30).returncode == 0


def test_reinstall_rebuilds_venv_for_other_python(
    installation: Installation, installed_copy: Path, fake_host_tools: tuple[Path, Path]
) -> None:
    current = base_interpreter(sys.executable)
    candidates = ["/usr/bin/python3", "python3.11", "python3.12", "python3.13", "python3.14"]
    others = [
        Path(found).resolve()
        for found in map(shutil.which, candidates)
        if found and Path(found).resolve() != current and can_create_venvs(found)
    ]
    if not others:
        pytest.skip(f"needs a Python 3.11 or newer with venv other than {current}")
    other = others[0]
    venv = installed_copy / VENV

    result = run_script(
        installation.source / "systemd" / "install.sh",
        installed_copy,
        fake_host_tools,
        "--no-deps",
        python=str(other),
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Rebuilding virtual environment {venv}: it runs {current}, not {other}" in (
        result.stdout
    )
    assert (venv / "bin/python").resolve() == other


def test_install_rejects_unknown_option(
    installation: Installation, tmp_path: Path, fake_host_tools: tuple[Path, Path]
) -> None:
    result = run_script(
        installation.source / "systemd" / "install.sh", tmp_path, fake_host_tools, "--bogus"
    )

    assert result.returncode == 2
    assert "unknown option '--bogus'" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_install_ignores_stale_build_folder(installation: Installation) -> None:
    assert list(installation.root.rglob(STALE_MODULE)) == []


def test_install_help_names_target(
    installation: Installation, tmp_path: Path, fake_host_tools: tuple[Path, Path]
) -> None:
    result = run_script(
        installation.source / "systemd" / "install.sh", tmp_path, fake_host_tools, "--help"
    )

    assert result.returncode == 0, result.stderr
    assert f"{tmp_path}/opt/identity-connector" in result.stdout
    assert "`pip wheel -w DIR /path/to/checkout`" in result.stdout
    assert "${" not in result.stdout
    assert list(tmp_path.iterdir()) == []


def test_install_wheel_dir_reinstalls_same_version(
    installation: Installation,
    installed_copy: Path,
    tmp_path: Path,
    fake_host_tools: tuple[Path, Path],
) -> None:
    wheel_dir = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--wheel-dir",
            str(wheel_dir),
            str(installation.source),
        ],
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        check=False,
    )
    assert build.returncode == 0, build.stderr
    site_packages = next((installed_copy / "opt/identity-connector/venv/lib").glob("python3*"))
    module = site_packages / "site-packages/daemon/sdnotify.py"
    module.write_text("stale = True\n")

    result = run_script(
        installation.source / "systemd" / "install.sh",
        installed_copy,
        fake_host_tools,
        "--no-deps",
        "--wheel-dir",
        str(wheel_dir),
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert module.read_bytes() == (REPO / "daemon/sdnotify.py").read_bytes()


def test_install_wheel_dir_uses_no_index(
    installation: Installation,
    installed_copy: Path,
    tmp_path: Path,
    fake_host_tools: tuple[Path, Path],
) -> None:
    # An empty wheel directory must fail, because pip may not fall back to an
    # index. The installed copy already has a venv, so none is created here.
    wheel_dir = tmp_path / "wheels"
    wheel_dir.mkdir()

    result = run_script(
        installation.source / "systemd" / "install.sh",
        installed_copy,
        fake_host_tools,
        "--no-deps",
        "--wheel-dir",
        str(wheel_dir),
    )

    assert result.returncode != 0
    assert "identity-connector" in result.stderr


def test_uninstall_keeps_config_and_data(
    installed_copy: Path, fake_host_tools: tuple[Path, Path]
) -> None:
    database = installed_copy / "var/lib/identity-connector/connector.sqlite3"
    database.parent.mkdir(parents=True)
    database.write_bytes(b"SQLite format 3\x00")
    config = installed_copy / "etc/identity-connector/config.toml"
    config_text = config.read_text()
    local_rules = installed_copy / LOCAL_RULES
    local_rules.write_text("# a scanner of this store\n")

    result = run_script(
        installed_copy / "opt/identity-connector/uninstall.sh", installed_copy, fake_host_tools
    )

    assert result.returncode == 0, result.stdout + result.stderr
    for removed in (
        "opt/identity-connector",
        "etc/systemd/system/identity-connector.service",
        "etc/sysusers.d/identity-connector.conf",
        "etc/tmpfiles.d/identity-connector.conf",
        "etc/udev/rules.d/99-identity-connector.rules",
    ):
        assert not (installed_copy / removed).exists(), removed
    assert config.read_text() == config_text
    assert file_mode(config) == 0o640
    assert database.read_bytes() == b"SQLite format 3\x00"
    assert local_rules.read_text() == "# a scanner of this store\n"
    assert "--purge" in result.stdout


def test_uninstall_purge_removes_config_and_data(
    installed_copy: Path, fake_host_tools: tuple[Path, Path]
) -> None:
    state = installed_copy / "var/lib/identity-connector"
    state.mkdir(parents=True)
    (state / "connector.sqlite3").write_bytes(b"")
    drop_in = installed_copy / "etc/systemd/system/identity-connector.service.d"
    drop_in.mkdir()
    (drop_in / "override.conf").write_text("[Service]\n")
    local_rules = installed_copy / LOCAL_RULES
    local_rules.write_text("# a scanner of this store\n")

    result = run_script(
        installed_copy / "opt/identity-connector/uninstall.sh",
        installed_copy,
        fake_host_tools,
        "--purge",
    )

    assert result.returncode == 0, result.stdout + result.stderr
    for removed in ("etc/identity-connector", "var/lib/identity-connector", drop_in, local_rules):
        assert not (installed_copy / removed).exists(), removed
    assert not (installed_copy / "opt/identity-connector").exists()


def test_uninstall_with_destdir_runs_no_host_command(
    installed_copy: Path, fake_host_tools: tuple[Path, Path]
) -> None:
    _, log = fake_host_tools

    result = run_script(
        installed_copy / "opt/identity-connector/uninstall.sh", installed_copy, fake_host_tools
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert not log.exists()


# Functions of install.sh that run only without DESTDIR, called after sourcing it.


def run_functions(
    commands: str, root: Path, bin_dir: Path, python: str = sys.executable
) -> subprocess.CompletedProcess[str]:
    """Source install.sh with DESTDIR=root, then run commands in the same bash."""
    environment = {
        **os.environ,
        "DESTDIR": str(root),
        "PYTHON": python,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
    }
    return subprocess.run(
        ["bash", "-c", f'source "$0"\n{commands}', str(INSTALL_SCRIPT)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
        check=False,
    )


CHECK_PYTHON = "check_python\ncheck_service_can_run_python"
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="runuser needs root to run the interpreter as another user"
)


def nobody_can_run(python: str) -> bool:
    check = [
        "runuser",
        "-u",
        "nobody",
        "--",
        python,
        "-I",
        "-c",
        "import sys; sys.exit(sys.version_info < (3, 11))",
    ]
    return subprocess.run(check, capture_output=True, timeout=30).returncode == 0


@pytest.fixture
def public_python() -> Path:
    """Return a Python 3.11 or newer with venv that every user can run, outside /tmp and homes."""
    candidates = [str(base_interpreter(sys.executable)), "/usr/bin/python3"]
    candidates += ["python3.11", "python3.12", "python3.13", "python3.14"]
    for candidate in map(shutil.which, candidates):
        if candidate is None:
            continue
        path = Path(candidate).resolve()
        hidden = ("/home/", "/root/", "/run/user/", "/tmp/", "/var/tmp/")
        if str(path).startswith(hidden):
            continue
        if can_create_venvs(str(path)) and nobody_can_run(str(path)):
            return path
    pytest.skip("needs a Python 3.11 or newer with venv that the user nobody can run")


@needs_root
def test_python_check_accepts_public_python(tmp_path: Path, public_python: Path) -> None:
    result = run_functions(CHECK_PYTHON, tmp_path / "root", tmp_path, python=str(public_python))

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert not (tmp_path / "root").exists()


@needs_root
def test_python_check_rejects_private_folder(tmp_path: Path) -> None:
    # Like pyenv's interpreters below /root, which is mode 0700.
    private = tmp_path / "private"
    private.mkdir()
    private.chmod(0o700)
    python = private / "python3"
    python.symlink_to(base_interpreter(sys.executable))

    result = run_functions(CHECK_PYTHON, tmp_path / "root", tmp_path, python=str(python))

    assert result.returncode == 1
    assert f"cannot run {python} (PYTHON={python}):" in result.stderr
    assert "Permission denied" in result.stderr
    assert f"PYTHON=/usr/bin/python3.11 {INSTALL_SCRIPT}" in result.stderr
    assert not (tmp_path / "root").exists()


@pytest.fixture
def folder_in_tmp() -> Iterator[Path]:
    """Return a new folder below /tmp that every user can search."""
    folder = Path(tempfile.mkdtemp(prefix="identity-connector-test-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


@needs_root
def test_python_check_rejects_hidden_folder(
    tmp_path: Path, public_python: Path, folder_in_tmp: Path
) -> None:
    # Every user can run it, but the unit's PrivateTmp=yes hides /tmp from the service.
    python = folder_in_tmp / "python3"
    python.symlink_to(public_python)

    result = run_functions(CHECK_PYTHON, tmp_path / "root", tmp_path, python=str(python))

    assert result.returncode == 1
    assert f"uses {python}, below /tmp, which the service cannot see" in result.stderr
    assert "PrivateTmp=yes" in result.stderr
    assert f"PYTHON=/usr/bin/python3.11 {INSTALL_SCRIPT}" in result.stderr


def run_activation(tmp_path: Path, systemd_running: bool, config_created: str) -> tuple[str, str]:
    """Run activate and print_next_steps with fake host tools; return the output and their log.

    systemd_is_running is replaced, so that the test does not depend on the
    init system of the machine that runs it.
    """
    bin_dir, log = write_fake_host_tools(tmp_path / "bin")
    commands = (
        f"systemd_is_running() {{ return {0 if systemd_running else 1}; }}\n"
        f"DESTDIR=\nCONFIG_CREATED={config_created}\nactivate\nprint_next_steps"
    )

    result = run_functions(commands, tmp_path / "root", bin_dir)

    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "root").exists()
    calls = log.read_text() if log.exists() else ""
    return result.stdout, calls


@pytest.mark.parametrize("config_created", ["yes", "no"])
def test_activate_without_systemd_says_so(tmp_path: Path, config_created: str) -> None:
    output, calls = run_activation(tmp_path, systemd_running=False, config_created=config_created)

    assert "Skipped systemctl daemon-reload: systemd is not running" in output
    assert "systemctl" not in calls
    assert "systemd-sysusers /etc/sysusers.d/identity-connector.conf" in calls
    last_step = output.split("systemd is not running on this host", 1)[1]
    assert "Once the host runs systemd as init" in last_step
    assert "       systemctl daemon-reload\n" in last_step
    assert "       systemctl enable --now identity-connector\n" in last_step
    assert "systemctl restart" not in output


def test_activate_with_systemd_reloads_units(tmp_path: Path) -> None:
    output, calls = run_activation(tmp_path, systemd_running=True, config_created="yes")

    assert "systemctl daemon-reload" in calls
    assert "Skipped systemctl daemon-reload" not in output
    assert "systemd is not running" not in output
    assert "       systemctl enable --now identity-connector\n" in output


# The configuration template. Settings are written "#key = value", and
# removing the "#" from every such line yields the full example configuration.


def uncomment_settings(text: str) -> str:
    return "\n".join(re.sub(r"^#(?=[\[A-Za-z])", "", line) for line in text.splitlines())


@pytest.fixture(scope="module")
def config_module() -> Any:
    # Imported here so that a broken daemon.config fails these tests only.
    from daemon import config

    return config


def test_template_parses_as_shipped(config_module: Any) -> None:
    config = config_module.parse_config(TEMPLATE.read_text(), source=str(TEMPLATE))

    assert config.stores.ids == ["STORE-001"]
    assert config.tls is None
    assert config.auth is None
    assert config.hq is None
    assert config.devices == []


def test_template_uncommented_parses(config_module: Any) -> None:
    config = config_module.parse_config(uncomment_settings(TEMPLATE.read_text()))

    assert config.tls is not None
    assert config.auth is not None
    assert config.hq is not None
    assert [device["kind"] for device in config.devices] == ["serial", "pcsc", "hid"]


@pytest.mark.parametrize(
    "section", ["server", "database", "policy", "logging", "auth", "hq", "local"]
)
def test_template_shows_defaults(config_module: Any, section: str) -> None:
    import msgspec

    config = config_module.parse_config(uncomment_settings(TEMPLATE.read_text()))
    section_value = getattr(config, section)
    struct_type = type(section_value)
    for field in msgspec.structs.fields(struct_type):
        if field.default is msgspec.NODEFAULT and field.default_factory is msgspec.NODEFAULT:
            continue  # required keys such as hq.url carry example values
        if field.name in {"api_key_files", "token_file"}:
            continue  # file paths are examples; their default is "none"
        default = (
            field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
        )
        assert (field.name, getattr(section_value, field.name)) == (field.name, default)


@pytest.mark.parametrize(
    "section", ["server", "database", "policy", "logging", "tls", "auth", "hq", "local"]
)
def test_template_lists_every_key(config_module: Any, section: str) -> None:
    import msgspec

    written = tomllib.loads(uncomment_settings(TEMPLATE.read_text()))[section]
    struct_type = msgspec.inspect.type_info(config_module.Config).fields
    field_type = next(field.type for field in struct_type if field.name == section)
    # Optional sections are `X | None`, so take the struct out of the union.
    if isinstance(field_type, msgspec.inspect.UnionType):
        field_type = next(
            member for member in field_type.types if isinstance(member, msgspec.inspect.StructType)
        )

    expected = {field.name for field in field_type.fields}
    assert sorted(expected - set(written)) == []


@pytest.mark.parametrize("extras", ["bogus", "pcsc;hid", "pcsc,"])
def test_install_rejects_unknown_extras(
    installation: Installation,
    tmp_path: Path,
    fake_host_tools: tuple[Path, Path],
    extras: str,
) -> None:
    result = run_script(
        installation.source / "systemd" / "install.sh",
        tmp_path,
        fake_host_tools,
        "--extras",
        extras,
    )

    assert result.returncode == 2
    assert f"--extras '{extras}' is invalid: use pcsc, hid or pcsc,hid" in result.stderr
    assert list(tmp_path.iterdir()) == []
