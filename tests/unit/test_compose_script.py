"""deploy/compose-test.sh surfaces the real build failure (issue 17): podman and
podman-compose are replaced by stubs that behave as they do when the base
image is missing (podman-compose's build then still exits 0)."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

BUILD_ERROR = "Error: creating build container: debian:bookworm-slim: image not known"


def stubs(tmp_path: Path, base_present: bool) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "podman").write_text(
        "#!/bin/sh\n"
        f'if [ "$1 $2" = "image exists" ]; then exit {0 if base_present else 1}; fi\n'
        'if [ "$1 $2" = "container exists" ]; then exit 1; fi\n'
        "exit 0\n")
    (bin_dir / "podman-compose").write_text(
        "#!/bin/sh\n"
        'for a in "$@"; do [ "$a" = build ] && { echo "STEP 1/9: FROM base"; '
        f'echo "{BUILD_ERROR}"; echo "exit code: 125"; exit 0; }}; done\n'
        "exit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IXUSR)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": sys.executable}


@pytest.mark.parametrize("base_present", [False, True])
def test_compose_test_names_the_real_failure(tmp_path: Path, base_present: bool) -> None:
    r = subprocess.run(["bash", str(ROOT / "deploy/compose-test.sh")], env=stubs(tmp_path, base_present),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    if base_present:
        assert "an image build failed; the build said:" in r.stderr and BUILD_ERROR in r.stderr, r.stderr
    else:
        base = next(line.split()[1] for line in (ROOT / "deploy/Dockerfile").read_text().splitlines()
                    if line.startswith("FROM "))
        assert f"base image {base} is not available locally" in r.stderr, r.stderr
        assert "container-setup.sh" in r.stderr
    assert "was not created" not in r.stderr
