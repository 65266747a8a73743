#!/bin/bash
# Install, upgrade or remove flowd as a systemd service (Raspberry Pi OS / Debian 12).
#
#   sudo deploy/install.sh                     install or upgrade, enable and start flowd
#   sudo deploy/install.sh --with-mosquitto    the same, plus a local mosquitto broker
#   sudo deploy/install.sh --uninstall         remove unit, virtualenv, flowctl and user;
#                                              keep /var/lib/flowd and /etc/flowd
#   sudo deploy/install.sh --uninstall --purge also delete /var/lib/flowd and /etc/flowd
#   sudo deploy/install.sh --root DIR          act on the tree under DIR instead of / (tests,
#                                              image staging); DESTDIR=DIR works the same
#
# Running it again changes nothing that is already right: it never overwrites
# /etc/flowd/flowd.toml or a task script you edited, and reinstalls the flowd
# package only when the source differs from the one installed (that is the upgrade).
# See deploy/README.md.

set -euo pipefail
umask 022   # the flowd user must be able to read the virtualenv, whatever root's umask is

SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=${DESTDIR:-/}
PYTHON=/usr/bin/python3
PIP_ARGS=""
UNINSTALL=0
PURGE=0
WITH_MOSQUITTO=0
USER_NAME=flowd
MARKER="# installed by flowd deploy/install.sh"

say() { printf 'flowd-install: %s\n' "$*"; }
die() { printf 'flowd-install: error: %s\n' "$*" >&2; exit 1; }

usage() {
    sed -n '2,15s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    cat <<'EOF'
Options:
  --root DIR          install into DIR (must hold etc/passwd and etc/group)
  --with-mosquitto    also install the Debian mosquitto broker (ignored with --root)
  --python PATH       interpreter for the virtualenv (default /usr/bin/python3, >= 3.11)
  --pip-args ARGS     extra arguments for pip install (e.g. "--no-index --find-links DIR")
  --uninstall         remove flowd (keeps data and configuration)
  --purge             with --uninstall: also delete /var/lib/flowd, /etc/flowd and drop-ins
EOF
}

while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || die "--root needs a folder"; ROOT=$2; shift 2 ;;
        --root=*) ROOT=${1#--root=}; shift ;;
        --python) [ $# -ge 2 ] || die "--python needs a path"; PYTHON=$2; shift 2 ;;
        --pip-args) [ $# -ge 2 ] || die "--pip-args needs a value"; PIP_ARGS=$2; shift 2 ;;
        --with-mosquitto) WITH_MOSQUITTO=1; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown option '$1'" ;;
    esac
done

[ "$(id -u)" = 0 ] || die "run as root (sudo $0): it creates a user and chowns files"
[ "$PURGE" = 0 ] || [ "$UNINSTALL" = 1 ] || die "--purge only goes with --uninstall"
[ -d "$ROOT" ] || die "--root $ROOT is not a folder"
ROOT=$(cd "$ROOT" && pwd)
P=${ROOT%/}                       # prefix for every target path: "" when installing into /
if [ -n "$P" ]; then
    if [ ! -f "$P/etc/passwd" ] || [ ! -f "$P/etc/group" ]; then
        die "--root $ROOT must hold etc/passwd and etc/group (the users of that system)"
    fi
    ACCOUNT_ARGS=(--prefix "$ROOT")   # useradd/userdel/groupdel edit $ROOT/etc, not the host's
else
    ACCOUNT_ARGS=()
fi

UNIT=$P/etc/systemd/system/flowd.service
VENV=$P/opt/flowd/venv
SHARE=$P/opt/flowd/share
WRAPPER=$P/usr/local/bin/flowctl
CONF_DIR=$P/etc/flowd
STATE_DIR=$P/var/lib/flowd

# Accounts are read from the target's files (system users are always local), so the
# same lookup works for / and for --root.
uid_of() { awk -F: -v n="$1" '$1 == n { print $3; found = 1 } END { exit !found }' "$P/etc/passwd"; }
gid_of() { awk -F: -v n="$1" '$1 == n { print $3; found = 1 } END { exit !found }' "$P/etc/group"; }

systemd_running() { [ -z "$P" ] && [ -d /run/systemd/system ]; }   # sd_booted()'s own test

# ensure_dir PATH MODE UID GID [recursive]: create it or correct mode/owner; say which.
ensure_dir() {
    local path=$1 mode=$2 uid=$3 gid=$4 recursive=${5:-}
    if [ ! -d "$path" ]; then
        mkdir -p "$path"
        chown "$uid:$gid" "$path"
        chmod "$mode" "$path"
        say "created $path ($mode, $uid:$gid)"
        return
    fi
    local now
    now=$(stat -c '%a %u %g' "$path")
    if [ "$now" = "$mode $uid $gid" ]; then
        say "ok      $path ($mode, $uid:$gid)"
        return
    fi
    if [ -n "$recursive" ] && [ "$(stat -c '%u %g' "$path")" != "$uid $gid" ]; then
        chown -R "$uid:$gid" "$path"   # data left by an earlier install under another uid
    else
        chown "$uid:$gid" "$path"
    fi
    chmod "$mode" "$path"
    say "fixed   $path (was mode/uid/gid $now, now $mode $uid $gid)"
}

# install_file SRC DEST MODE UID GID: copy when content, mode or owner differ.
# Sets WROTE=1 when it wrote (a function called in an `if` or `||` would run without
# set -e, so it reports through a variable instead of its exit status).
install_file() {
    local src=$1 dest=$2 mode=$3 uid=$4 gid=$5
    WROTE=0
    [ -f "$src" ] || die "$src is missing from the source tree"
    if [ -f "$dest" ] && cmp -s "$src" "$dest" && [ "$(stat -c '%a %u %g' "$dest")" = "$mode $uid $gid" ]; then
        say "ok      $dest"
        return
    fi
    mkdir -p "$(dirname "$dest")"
    install -m "$mode" -o "$uid" -g "$gid" "$src" "$dest"
    WROTE=1
    say "wrote   $dest"
}

# The files pip builds flowd from; their hash tells whether the installed copy is current.
source_files() {
    local f
    for f in pyproject.toml README.md LICENSE; do
        [ -f "$SRC/$f" ] && printf '%s\n' "$f"
    done
    (cd "$SRC" && find flowd -type f ! -path '*/__pycache__/*' ! -name '*.py[co]' | LC_ALL=C sort)
}
source_hash() { (cd "$SRC" && source_files | xargs -d '\n' sha256sum | sha256sum | cut -c1-64); }

uninstall() {
    if [ -f "$UNIT" ]; then
        if systemd_running; then
            systemctl disable --now flowd.service || true
        else
            systemctl --root="$ROOT" disable flowd.service || true
        fi
        rm -f "$UNIT"
        say "removed $UNIT"
        if systemd_running; then systemctl daemon-reload; fi
    else
        say "no unit at $UNIT"
    fi
    if [ -d "$P/opt/flowd" ]; then rm -rf "$P/opt/flowd"; say "removed $P/opt/flowd (virtualenv)"; fi
    if [ -f "$WRAPPER" ] && grep -qF "$MARKER" "$WRAPPER"; then rm -f "$WRAPPER"; say "removed $WRAPPER"; fi
    if uid_of "$USER_NAME" >/dev/null; then
        userdel "${ACCOUNT_ARGS[@]}" "$USER_NAME"
        say "removed user $USER_NAME"
    fi
    if gid_of "$USER_NAME" >/dev/null; then
        groupdel "${ACCOUNT_ARGS[@]}" "$USER_NAME"
        say "removed group $USER_NAME"
    fi
    if [ "$PURGE" = 1 ]; then
        rm -rf "$STATE_DIR" "$CONF_DIR" "$P/etc/systemd/system/flowd.service.d"
        say "purged $STATE_DIR, $CONF_DIR and any flowd.service.d drop-ins"
    else
        say "kept $STATE_DIR (database) and $CONF_DIR (configuration, task scripts); --uninstall --purge deletes them"
    fi
    say "flowd uninstalled"
}

if [ "$UNINSTALL" = 1 ]; then
    uninstall
    exit 0
fi

# --- checks before touching anything ---
if [ ! -f "$SRC/pyproject.toml" ] || [ ! -d "$SRC/flowd" ]; then
    die "$SRC does not look like the flowd source tree"
fi
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
    || die "$PYTHON is missing or older than Python 3.11 (flowd needs tomllib)"
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    [ -z "$P" ] || die "$PYTHON cannot create virtualenvs; install python3-venv"
    say "installing python3-venv (needed for the virtualenv)"
    apt-get update
    apt-get install -y python3-venv
fi

# --- account ---
if uid_of "$USER_NAME" >/dev/null; then
    say "ok      user $USER_NAME (uid $(uid_of "$USER_NAME"))"
else
    # A group left over from an earlier install is reused rather than failing.
    if gid_of "$USER_NAME" >/dev/null; then group_args=(--gid "$USER_NAME"); else group_args=(--user-group); fi
    useradd "${ACCOUNT_ARGS[@]}" --system "${group_args[@]}" --home-dir /var/lib/flowd --no-create-home \
        --shell /usr/sbin/nologin --comment "flowd daemon" "$USER_NAME"
    say "created system user $USER_NAME (uid $(uid_of "$USER_NAME")) in $P/etc/passwd"
fi
FLOWD_UID=$(uid_of "$USER_NAME")
FLOWD_GID=$(gid_of "$USER_NAME")

# --- folders ---
# /etc/flowd/tasks holds code that runs as flowd: only root may write there, or
# anyone who can write a task script can act as the daemon.
ensure_dir "$CONF_DIR" 755 0 0
ensure_dir "$CONF_DIR/tasks" 755 0 0
ensure_dir "$STATE_DIR" 700 "$FLOWD_UID" "$FLOWD_GID" recursive
ensure_dir "$P/opt/flowd" 755 0 0
ensure_dir "$SHARE" 755 0 0

# --- virtualenv and the flowd package ---
CODE_CHANGED=0
if [ -x "$VENV/bin/python" ]; then
    say "ok      virtualenv $VENV"
else
    "$PYTHON" -m venv "$VENV"
    say "created virtualenv $VENV ($("$VENV/bin/python" --version))"
fi
HASH=$(source_hash)
if [ -f "$VENV/.flowd-source" ] && [ "$(cat "$VENV/.flowd-source")" = "$HASH" ] \
        && "$VENV/bin/python" -c 'import flowd' 2>/dev/null; then
    say "ok      flowd already installed from this source (${HASH:0:12})"
else
    # Build from a copy so pip leaves no build/ or *.egg-info in the source tree.
    STAGE=$(mktemp -d)
    trap 'rm -rf "$STAGE"' EXIT
    source_files | (cd "$SRC" && xargs -d '\n' cp --parents -t "$STAGE")
    # shellcheck disable=SC2086  # PIP_ARGS is a list of words on purpose
    "$VENV/bin/pip" install --quiet --disable-pip-version-check $PIP_ARGS "$STAGE"
    printf '%s\n' "$HASH" > "$VENV/.flowd-source"
    CODE_CHANGED=1
    say "installed flowd $("$VENV/bin/python" -c 'import flowd; print(flowd.__version__)') into $VENV (${HASH:0:12})"
fi
if "$VENV/bin/python" -c 'import systemd.daemon' 2>/dev/null; then
    say "ok      systemd-python present"
elif command -v pkg-config >/dev/null && pkg-config --exists libsystemd; then
    # shellcheck disable=SC2086
    if "$VENV/bin/pip" install --quiet --disable-pip-version-check $PIP_ARGS 'systemd-python>=235'; then
        say "installed systemd-python (journal fields, sd_notify)"
    else
        say "warning: systemd-python did not build (gcc and python3-dev needed); flowd speaks the journal and sd_notify protocols itself"
    fi
else
    say "skipped systemd-python: libsystemd-dev and pkg-config not both present; flowd speaks the journal and sd_notify protocols itself (same fields and priorities)"
fi

# --- flowctl for administrators ---
# Runs as flowd with systemd's STATE_DIRECTORY, so it finds the daemon's database with
# the default configuration and never leaves root-owned SQLite files in /var/lib/flowd.
WRAPPER_TMP=$(mktemp)
cat > "$WRAPPER_TMP" <<EOF
#!/bin/sh
$MARKER
# flowctl as the flowd user, with the paths the service gets from systemd.
export STATE_DIRECTORY=/var/lib/flowd
if [ "\$(id -u)" = 0 ]; then
    exec runuser -u $USER_NAME -- /opt/flowd/venv/bin/flowctl "\$@"
fi
exec /opt/flowd/venv/bin/flowctl "\$@"
EOF
install_file "$WRAPPER_TMP" "$WRAPPER" 755 0 0
rm -f "$WRAPPER_TMP"

# --- configuration and example tasks (never overwritten) ---
install_file "$SRC/config/flowd.toml" "$SHARE/flowd.toml.example" 644 0 0
install_file "$SRC/deploy/README.md" "$SHARE/README.md" 644 0 0
if [ -f "$CONF_DIR/flowd.toml" ]; then
    say "kept    $CONF_DIR/flowd.toml (never overwritten; the current example is $SHARE/flowd.toml.example)"
    # An earlier --uninstall removed the group; a reinstall may give flowd another gid.
    if [ "$(stat -c %g "$CONF_DIR/flowd.toml")" != "$FLOWD_GID" ]; then
        chgrp "$FLOWD_GID" "$CONF_DIR/flowd.toml"
        say "fixed   group of $CONF_DIR/flowd.toml (now $USER_NAME, which must read it)"
    fi
else
    # 0640 root:flowd: the daemon reads it, may hold a broker password, only root edits it.
    install -m 640 -o 0 -g "$FLOWD_GID" "$SRC/config/flowd.toml" "$CONF_DIR/flowd.toml"
    say "wrote   $CONF_DIR/flowd.toml (example with every default)"
fi
found_task=0
# The project's example scripts only: in a git checkout, the tracked ones (a script
# written there while trying flowd out is not an example to install).
if git -c safe.directory="$SRC" -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    mapfile -t examples < <(git -c safe.directory="$SRC" -C "$SRC" ls-files -- 'tasks/task_*.py')
    examples=("${examples[@]/#/$SRC/}")
else
    examples=("$SRC"/tasks/task_*.py)
fi
for script in "${examples[@]}"; do
    [ -f "$script" ] || continue
    found_task=1
    dest=$CONF_DIR/tasks/$(basename "$script")
    if [ -e "$dest" ]; then
        say "kept    $dest"
    else
        install -m 644 -o 0 -g 0 "$script" "$dest"
        say "wrote   $dest"
    fi
done
[ "$found_task" = 1 ] || say "no example task scripts in $SRC/tasks"

# --- broker ---
if [ "$WITH_MOSQUITTO" = 1 ]; then
    if [ -n "$P" ]; then
        say "skipped mosquitto: --with-mosquitto installs with apt on this machine, not into --root"
    elif dpkg-query -W -f='${Status}' mosquitto 2>/dev/null | grep -q 'install ok installed'; then
        say "ok      mosquitto already installed"
    else
        # Offline, or with a mirror down, apt can still install from the lists it has.
        apt-get update || say "warning: apt-get update failed; installing from the package lists already here"
        apt-get install -y mosquitto
        say "installed mosquitto (Debian's default: listens on localhost only)"
    fi
fi

# --- the unit ---
install_file "$SRC/flowd.service" "$UNIT" 644 0 0
UNIT_CHANGED=$WROTE
if [ -n "$P" ]; then
    systemctl --root="$ROOT" --quiet enable flowd.service
    say "enabled flowd.service in $ROOT (wants link only; --root never starts or reloads anything)"
elif ! systemd_running; then
    systemctl --root=/ --quiet enable flowd.service
    say "systemd is not PID 1 here (PID 1 is $(cat /proc/1/comm 2>/dev/null || echo unknown)):" \
        "flowd.service enabled on disk only, not started; it starts at the next boot under systemd"
else
    was_active=0
    if systemctl --quiet is-active flowd.service; then was_active=1; fi
    if [ "$UNIT_CHANGED" = 1 ]; then systemctl daemon-reload; fi
    systemctl --quiet enable --now flowd.service
    if [ "$was_active" = 1 ] && [ $((CODE_CHANGED + UNIT_CHANGED)) -gt 0 ]; then
        systemctl restart flowd.service
        say "restarted flowd.service (new code or unit)"
    elif [ "$was_active" = 1 ]; then
        say "ok      flowd.service running"
    else
        say "started flowd.service"
    fi
fi
say "done. Configure $CONF_DIR/flowd.toml and $CONF_DIR/tasks, then: systemctl reload flowd; journalctl -u flowd -f"
