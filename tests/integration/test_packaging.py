"""The wheel an admin installs (issue 17): `pip wheel .`, then a fresh venv:
`smtpguard --version`, the man page, the sample configuration and unit, the
documentation; SPDX license metadata; `make install DESTDIR=`."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(out)],
                   check=True, capture_output=True, timeout=600)
    return next(out.glob("smtpguard-*.whl"))


def test_wheel_metadata_and_files(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: MIT" in meta
    data = [n.split(".data/data/", 1)[1] for n in names if ".data/data/" in n]
    for path in ("share/man/man8/smtpguard.8", "share/doc/smtpguard/examples/smtpguard.example.toml",
                 "share/doc/smtpguard/examples/smtpguard.service", "share/doc/smtpguard/docs/configuration.md",
                 "share/doc/smtpguard/docs/deployment.md", "share/doc/smtpguard/README.md",
                 "share/doc/smtpguard/CHANGELOG.md"):
        assert path in data, data


def test_fresh_venv_from_the_wheel(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([venv / "bin" / "pip", "install", "-q", str(wheel)], check=True, capture_output=True,
                   timeout=600)
    version = subprocess.run([venv / "bin" / "smtpguard", "--version"], check=True, capture_output=True,
                             text=True).stdout
    assert version.startswith("smtpguard ") and version.split()[1][0].isdigit()
    assert (venv / "share/man/man8/smtpguard.8").read_text().startswith(".TH SMTPGUARD 8")
    sample = venv / "share/doc/smtpguard/examples/smtpguard.example.toml"
    checked = subprocess.run([venv / "bin" / "smtpguard", "check-config", "-c", str(sample)],
                             capture_output=True, text=True)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr


def test_make_install_destdir(tmp_path: Path) -> None:
    root = tmp_path / "root"
    subprocess.run(["make", "-C", str(ROOT), "install", f"DESTDIR={root}", f"PYTHON={sys.executable}"],
                   check=True, capture_output=True, timeout=900)
    for path in ("etc/smtpguard/smtpguard.toml", "lib/systemd/system/smtpguard.service",
                 "usr/share/man/man8/smtpguard.8", "usr/share/doc/smtpguard/docs/configuration.md",
                 "opt/smtpguard/bin/smtpguard"):
        assert (root / path).exists(), path
    (root / "etc/smtpguard/smtpguard.toml").write_text("# mine\n")
    subprocess.run(["make", "-C", str(ROOT), "install", f"DESTDIR={root}", f"PYTHON={sys.executable}"],
                   check=True, capture_output=True, timeout=900)
    assert (root / "etc/smtpguard/smtpguard.toml").read_text() == "# mine\n"  # an edited file is kept
