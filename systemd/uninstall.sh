#!/usr/bin/env bash
# Remove Identity Connector as installed by install.sh.
#
# Usage: uninstall.sh [--purge]
#
# Removes the program with its documentation, the unit and the sysusers,
# tmpfiles and udev files.
# Keeps the configuration (/etc/identity-connector), the database and its
# HMAC secret (/var/lib/identity-connector) and unit drop-ins
# (/etc/systemd/system/identity-connector.service.d) unless --purge is given.
# The system user and group stay in either case, because files elsewhere,
# such as a backup or a copied key, may still belong to them. Remove them
# with `userdel identity-connector` once no file does.
#
# Environment:
#   DESTDIR  remove from below this root instead of / (default: empty). With
#            DESTDIR set, nothing is run on the host (no systemctl or udevadm).
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: uninstall.sh [--purge]

Remove Identity Connector's program and documentation, unit, sysusers,
tmpfiles and udev files.

Options:
  --purge     also delete the configuration, keys, unit drop-ins, and the
              database with its HMAC secret in /var/lib/identity-connector
  -h, --help  show this help
EOF
}

DESTDIR=${DESTDIR:-}
PREFIX=/opt/identity-connector
CONFIG_DIR=/etc/identity-connector
STATE_DIR=/var/lib/identity-connector
UNIT=identity-connector.service
UNIT_PATH=/etc/systemd/system/$UNIT
purge=no

while [ $# -gt 0 ]; do
    case "$1" in
        --purge)
            purge=yes
            shift
            ;;
        -h|--help)
            usage
            exit 0
            ;;
        *)
            echo "error: unknown option '$1'" >&2
            usage >&2
            exit 2
            ;;
    esac
done

if [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
    echo "error: uninstalling from / needs root; run it with sudo, or set DESTDIR" >&2
    exit 1
fi

# Stop the service before its program goes away. /run/systemd/system exists
# only when systemd is the running init.
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
    systemctl disable --now "$UNIT" 2>/dev/null || true
fi

remove() {
    local path
    for path in "$@"; do
        if [ -e "$DESTDIR$path" ] || [ -L "$DESTDIR$path" ]; then
            rm -rf -- "$DESTDIR$path"
            echo "Removed $DESTDIR$path"
        fi
    done
}

# This script may run from $PREFIX itself. Deleting it is safe: bash keeps
# the open file and reads the rest of the script from there.
remove "$PREFIX" \
    "$UNIT_PATH" \
    /etc/sysusers.d/identity-connector.conf \
    /etc/tmpfiles.d/identity-connector.conf \
    /etc/udev/rules.d/99-identity-connector.rules

# Written by the administrator (operations.md, "Scanners"), so kept like the configuration.
LOCAL_RULES=/etc/udev/rules.d/98-identity-connector-local.rules

if [ "$purge" = yes ]; then
    remove "$CONFIG_DIR" "$STATE_DIR" "$UNIT_PATH.d" "$LOCAL_RULES"
else
    for path in "$CONFIG_DIR" "$STATE_DIR" "$UNIT_PATH.d" "$LOCAL_RULES"; do
        if [ -e "$DESTDIR$path" ]; then
            echo "Kept $DESTDIR$path (remove it with --purge)"
        fi
    done
fi

if [ -z "$DESTDIR" ]; then
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    fi
    if command -v udevadm >/dev/null && [ -d /run/udev ]; then
        udevadm control --reload-rules
    fi
fi
