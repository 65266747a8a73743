#!/usr/bin/env bash
# Set up a fresh Debian 12 / Raspberry Pi OS machine for running and testing flowd from
# this checkout: system packages (only what is missing), then a virtualenv in .venv
# with flowd installed in editable mode and the test tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# tests/test_booted_debian.py boots a minimal Debian 12 root under systemd to test deploy/install.sh.
[ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
[ -x /usr/bin/python3 ] && ! /usr/bin/python3 -c 'import seccomp' >/dev/null 2>&1 && need+=(python3-seccomp)
# systemd-python (journal logging) compiles against libsystemd.
pkg-config --exists libsystemd 2>/dev/null || need+=(libsystemd-dev pkg-config)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
# The power-cut tests (tests/lossyfs.py) mount a FUSE filesystem through mfusepy, which loads libfuse3.
command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
dpkg -s libfuse3-3 >/dev/null 2>&1 || need+=(libfuse3-3)
python3 -c 'import os, sysconfig; assert os.path.exists(sysconfig.get_paths()["include"] + "/Python.h")' \
    >/dev/null 2>&1 || need+=(python3-dev)
if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup: installing ${need[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,systemd]'
