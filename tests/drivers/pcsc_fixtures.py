"""A real pcscd with the vsmartcard vpcd reader driver, started and stopped by the tests.

pcsc-lite 1.9.9 (Debian 12) serves clients on the fixed socket
/run/pcscd/pcscd.comm, so only one pcscd can run on the machine. A lock file
keeps two test sessions from sharing it, and the fixture refuses to run next to
a pcscd it did not start. The reader list comes from a configuration folder
of our own (``pcscd --config``), so a test can also start pcscd without the
virtual reader.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.devices import process_exists
from tests.drivers.vpcd import VPCD_READER

PCSCD_PID_FILE = Path("/run/pcscd/pcscd.pid")
VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
LOCK_FILE = Path(tempfile.gettempdir()) / "identity-connector-pcscd-tests.lock"

LOCK_TIMEOUT = 90.0  # seconds another test session may hold pcscd
START_TIMEOUT = 15.0  # seconds for pcscd to list its readers on a loaded machine
STOP_TIMEOUT = 10.0

# The Debian package's /etc/reader.conf.d/vpcd, written out here so the tests do
# not depend on /etc. The device name "/dev/null" makes vpcd listen instead of
# connecting out, on all IPv4 addresses because vpcd binds no other way. The
# channel id 0x8C7B is port 35963 for slot 0, and slot 1 takes port 35964.
VPCD_READER_CONF = f"""\
FRIENDLYNAME "Virtual PCD"
DEVICENAME   /dev/null:0x8C7B
LIBPATH      {VPCD_DRIVER}
CHANNELID    0x8C7B
"""


def _pid_from_file() -> int | None:
    try:
        text = PCSCD_PID_FILE.read_text()
    except FileNotFoundError:
        return None
    # pcscd writes the pid followed by a newline and a NUL byte.
    text = text.strip("\n\x00 ")
    return int(text) if text.isdigit() else None


def list_readers() -> list[str] | None:
    """Return pcscd's reader names, or None while the service is not reachable."""
    from smartcard import scard

    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hresult != scard.SCARD_S_SUCCESS:
        return None
    try:
        hresult, readers = scard.SCardListReaders(context, [])
        if hresult == scard.SCARD_E_NO_READERS_AVAILABLE:
            return []
        if hresult != scard.SCARD_S_SUCCESS:
            return None
        return list(readers)
    finally:
        scard.SCardReleaseContext(context)


class Pcscd:
    """Controls one pcscd process in the foreground; ``start`` and ``stop`` may repeat."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.with_reader_dir = workdir / "reader.conf.d"
        self.without_reader_dir = workdir / "reader.conf.d-empty"
        self.with_reader_dir.mkdir()
        self.without_reader_dir.mkdir()
        (self.with_reader_dir / "vpcd").write_text(VPCD_READER_CONF)
        self.log_path = workdir / "pcscd.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.with_reader = True

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, *, with_reader: bool = True) -> None:
        """Start pcscd and wait until it serves clients (and lists the vpcd reader if asked)."""
        assert not self.running, "pcscd is already running"
        config_dir = self.with_reader_dir if with_reader else self.without_reader_dir
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen(
                ["pcscd", "--foreground", "--info", "--config", str(config_dir)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        self.with_reader = with_reader

        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail(f"pcscd exited with status {self.process.returncode} at start")
            readers = list_readers()
            if readers is not None and (VPCD_READER in readers) == with_reader:
                return
            time.sleep(0.05)
        self._fail(f"pcscd did not list the expected readers within {START_TIMEOUT} s")

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop pcscd with ``sig`` (SIGKILL plays a crash) and reap it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        self.process = None

    def ensure(self) -> None:
        """Leave pcscd running with the vpcd reader, whatever the previous test did."""
        if self.running and self.with_reader:
            return
        self.stop()
        self.start(with_reader=True)

    def _fail(self, message: str) -> None:
        log_tail = self.log_path.read_text(errors="replace")[-2000:]
        self.stop(signal.SIGKILL)
        pytest.fail(f"{message}; pcscd log ({self.log_path}):\n{log_tail}")


@contextlib.contextmanager
def _exclusive_lock() -> Iterator[None]:
    with LOCK_FILE.open("a") as lock_file:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"another test session held {LOCK_FILE} for {LOCK_TIMEOUT} s; "
                        "only one may run pcscd at a time"
                    )
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def pcscd_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pcscd]:
    if shutil.which("pcscd") is None or not VPCD_DRIVER.exists():
        pytest.skip("pcscd or vsmartcard-vpcd is not installed: run `bash tests/system-deps.sh`")

    with _exclusive_lock():
        other_pid = _pid_from_file()
        if other_pid is not None and process_exists(other_pid):
            pytest.fail(
                f"a pcscd not started by the tests is running (pid {other_pid}); "
                "stop it so the tests can start their own with the vpcd reader"
            )
        daemon = Pcscd(tmp_path_factory.mktemp("pcscd"))
        daemon.start()
        try:
            yield daemon
        finally:
            daemon.stop()


@pytest.fixture
def pcscd(pcscd_session: Pcscd) -> Pcscd:
    """A running pcscd listing the vpcd reader at the start of the test."""
    pcscd_session.ensure()
    return pcscd_session
