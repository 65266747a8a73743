#!/usr/bin/env bash
# Set up a fresh Debian 12 / Raspberry Pi OS machine for flowd from this checkout:
# system packages (only what is missing), then a virtualenv in .venv with flowd
# installed in editable mode. Idempotent.
#
#   ./scripts/setup.sh         running and testing: also the test tools, the database
#                              and queue drivers, journal logging, FUSE for power cuts
#   ./scripts/setup.sh --run   running only: a local broker (mosquitto, started by apt)
#                              and flowd itself
set -euo pipefail
cd "$(dirname "$0")/.."

mode=all
case "${1:-}" in
    "") ;;
    --run) mode=run ;;
    *) echo "usage: $0 [--run]" >&2; exit 2 ;;
esac

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ "$mode" = all ]; then
    command -v openssl >/dev/null 2>&1 || need+=(openssl)
    command -v sqlite3 >/dev/null 2>&1 || need+=(sqlite3)
    command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
    [ -x /usr/bin/python3 ] && ! /usr/bin/python3 -c 'import seccomp' >/dev/null 2>&1 && need+=(python3-seccomp)
    # systemd-python (journal logging) compiles against libsystemd.
    pkg-config --exists libsystemd 2>/dev/null || need+=(libsystemd-dev pkg-config)
    command -v gcc >/dev/null 2>&1 || need+=(gcc)
    # The power-cut tests (tests/lossyfs.py) mount a FUSE filesystem through mfusepy, which loads libfuse3.
    command -v fusermount3 >/dev/null 2>&1 || need+=(fuse3)
    dpkg -s libfuse3-3 >/dev/null 2>&1 || need+=(libfuse3-3)
    # tests/test_booted_debian.py boots a minimal Debian 12 root under systemd to test deploy/install.sh.
    [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
    # The web console's browser tests drive Debian's chromium headless through its chromedriver.
    [ -x /usr/bin/chromium ] || need+=(chromium)
    [ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
    python3 -c 'import os, sysconfig; assert os.path.exists(sysconfig.get_paths()["include"] + "/Python.h")' \
        >/dev/null 2>&1 || need+=(python3-dev)
fi
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
if [ "$mode" = all ]; then
        .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test,systemd]'
    else
        .venv/bin/python -m pip install -q --disable-pip-version-check -e .
fi
