#!/usr/bin/env bash
# Install Identity Connector as a systemd service from this checkout.
#
# Usage: systemd/install.sh [--wheel-dir DIR] [--extras LIST] [--no-deps]
#                           [--system-site-packages]
#
# Environment:
#   DESTDIR  install below this root instead of / (default: empty). With
#            DESTDIR set, nothing is run on the host (no systemctl,
#            systemd-sysusers, systemd-tmpfiles or udevadm), and the files
#            get no identity-connector group, which the tmpfiles rule sets
#            at the target's next boot.
#   PYTHON   interpreter for the virtual environment (default: python3,
#            which must be 3.11 or newer; Debian needs python3-venv).
#
# Layout, chosen because this is software installed by the administrator and
# not by a Debian package (dpkg owns /usr/lib):
#   /opt/identity-connector/venv                      program (virtual environment)
#   /opt/identity-connector/config.toml.example       newest configuration template
#   /opt/identity-connector/uninstall.sh              uninstaller
#   /etc/systemd/system/identity-connector.service    unit
#   /etc/sysusers.d/identity-connector.conf           system user
#   /etc/tmpfiles.d/identity-connector.conf           modes of config and keys
#   /etc/udev/rules.d/99-identity-connector.rules     scanner access and names
#   /etc/identity-connector/config.toml               configuration, never overwritten
#
# Running it again upgrades the program and the files above, except
# config.toml. It neither starts nor restarts the service.
set -euo pipefail

usage() {
    cat <<EOF
Usage: systemd/install.sh [OPTIONS]

Install Identity Connector into ${DESTDIR:-}/opt/identity-connector and its
systemd, sysusers, tmpfiles and udev files into ${DESTDIR:-}/etc.

Environment: DESTDIR installs below that folder and runs nothing on the host;
PYTHON names the interpreter for the virtual environment (3.11 or newer).

Options:
  --wheel-dir DIR         install from the wheels in DIR only, without an
                          index (for a box without internet access; build DIR
                          with \`pip wheel -w DIR /path/to/checkout\`)
  --extras LIST           also install the scanner drivers' packages: pcsc
                          (pyscard, for PC/SC readers; building it needs swig
                          and libpcsclite-dev), hid (evdev, for HID wedge
                          scanners), or pcsc,hid
  --no-deps               install the project without its dependencies, which
                          must then be present already (see the next option)
  --system-site-packages  let the virtual environment see the interpreter's
                          own site-packages, for dependencies from Debian
  -h, --help              show this help
EOF
}

SOURCE_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SYSTEMD_DIR="$SOURCE_DIR/systemd"
DESTDIR=${DESTDIR:-}
PYTHON=${PYTHON:-python3}

PREFIX=/opt/identity-connector
CONFIG_DIR=/etc/identity-connector
UNIT_DIR=/etc/systemd/system
SYSUSERS_DIR=/etc/sysusers.d
TMPFILES_DIR=/etc/tmpfiles.d
UDEV_RULES_DIR=/etc/udev/rules.d
SERVICE_GROUP=identity-connector

wheel_dir=""
extras=""
venv_options=()
pip_options=()

while [ $# -gt 0 ]; do
    case "$1" in
        --wheel-dir)
            [ $# -ge 2 ] || { echo "error: --wheel-dir needs a directory" >&2; exit 2; }
            wheel_dir=$(cd "$2" && pwd)
            shift 2
            ;;
        --extras)
            [ $# -ge 2 ] || { echo "error: --extras needs a list such as pcsc,hid" >&2; exit 2; }
            case "$2" in
                pcsc|hid|pcsc,hid|hid,pcsc) extras="[$2]" ;;
                *)
                    echo "error: --extras '$2' is invalid: use pcsc, hid or pcsc,hid" >&2
                    exit 2
                    ;;
            esac
            shift 2
            ;;
        --no-deps)
            pip_options+=(--no-deps)
            shift
            ;;
        --system-site-packages)
            venv_options+=(--system-site-packages)
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
    echo "error: installing into / needs root; run it with sudo, or set DESTDIR" >&2
    exit 1
fi

# Files are created with the modes given below, not those the umask leaves.
umask 022

check_python() {
    if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
        echo "error: $PYTHON is missing or older than Python 3.11; set PYTHON to a newer one" >&2
        exit 1
    fi
    if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
        echo "error: $PYTHON cannot create virtual environments;" \
            "on Debian run 'apt-get install python3-venv'" >&2
        exit 1
    fi
}

# Creates the virtual environment unless a working one exists, then installs
# the project into it. An existing environment is upgraded in place because
# a virtual environment cannot be moved: its scripts name their own path.
install_program() {
    local venv="$DESTDIR$PREFIX/venv"

    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c '' 2>/dev/null; then
        echo "Creating virtual environment $venv"
        rm -rf "$venv"
        "$PYTHON" -m venv "${venv_options[@]}" "$venv"
    fi

    local pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade)

    echo "Installing identity-connector into $venv"
    if [ -z "$wheel_dir" ]; then
        # setuptools builds in the checkout's build/ folder and copies whatever it holds, so
        # a module deleted upstream would stay installed after a git pull.
        rm -rf "$SOURCE_DIR/build"
        # pip rebuilds and reinstalls a project given as a directory even when
        # its version is unchanged; dependencies are upgraded only if needed.
        "${pip[@]}" "${pip_options[@]}" "$SOURCE_DIR$extras"
    else
        pip+=(--no-index --find-links "$wheel_dir")
        "${pip[@]}" "${pip_options[@]}" "identity-connector$extras"
        # pip keeps an installed wheel of the same version, but two builds of
        # one checkout share the version, so reinstall the project alone.
        "${pip[@]}" --no-deps --force-reinstall identity-connector
    fi

    install -m 0644 "$SYSTEMD_DIR/config.toml" "$DESTDIR$PREFIX/config.toml.example"
    install -m 0755 "$SYSTEMD_DIR/uninstall.sh" "$DESTDIR$PREFIX/uninstall.sh"
    if [ -f "$SOURCE_DIR/docs/operations.md" ]; then
        install -D -m 0644 "$SOURCE_DIR/docs/operations.md" "$DESTDIR$PREFIX/docs/operations.md"
    fi
}

install_system_files() {
    install -D -m 0644 "$SYSTEMD_DIR/identity-connector.service" \
        "$DESTDIR$UNIT_DIR/identity-connector.service"
    install -D -m 0644 "$SYSTEMD_DIR/sysusers.conf" "$DESTDIR$SYSUSERS_DIR/identity-connector.conf"
    install -D -m 0644 "$SYSTEMD_DIR/tmpfiles.conf" "$DESTDIR$TMPFILES_DIR/identity-connector.conf"
    install -D -m 0644 "$SYSTEMD_DIR/99-identity-connector.rules" \
        "$DESTDIR$UDEV_RULES_DIR/99-identity-connector.rules"
}

# Installs the configuration template only where no configuration exists, so
# an upgrade never loses the operator's settings.
install_config() {
    local config="$DESTDIR$CONFIG_DIR/config.toml"

    install -d -m 0755 "$DESTDIR$CONFIG_DIR"
    install -d -m 0750 "$DESTDIR$CONFIG_DIR/keys" "$DESTDIR$CONFIG_DIR/tls"

    if [ -e "$config" ] || [ -L "$config" ]; then
        echo "Keeping existing $config"
        CONFIG_CREATED=no
    else
        install -m 0640 "$SYSTEMD_DIR/config.toml" "$config"
        echo "Created $config from the template"
        CONFIG_CREATED=yes
    fi
}

# Applies the new files on this host. Runs only without DESTDIR.
activate() {
    if command -v systemd-sysusers >/dev/null; then
        systemd-sysusers "$SYSUSERS_DIR/identity-connector.conf"
    fi

    # The tmpfiles rule gives config.toml, keys/ and tls/ the service group.
    if command -v systemd-tmpfiles >/dev/null; then
        systemd-tmpfiles --create "$TMPFILES_DIR/identity-connector.conf"
    elif getent group "$SERVICE_GROUP" >/dev/null; then
        chgrp "$SERVICE_GROUP" "$CONFIG_DIR/config.toml" "$CONFIG_DIR/keys" "$CONFIG_DIR/tls"
    fi

    # A scanner already plugged in gets the new group and name only when its
    # udev rules run again, which the "change" event does.
    if command -v udevadm >/dev/null && [ -d /run/udev ]; then
        udevadm control --reload-rules
        udevadm trigger --action=change --subsystem-match=tty --subsystem-match=input
    fi

    # /run/systemd/system exists only when systemd is the running init.
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    fi
}

print_next_steps() {
    local step=1

    echo
    echo "Next steps:"
    if [ -n "$DESTDIR" ]; then
        echo "  $((step++)). On the target, create the user and apply modes and udev rules:"
        echo "       systemd-sysusers $SYSUSERS_DIR/identity-connector.conf"
        echo "       systemd-tmpfiles --create $TMPFILES_DIR/identity-connector.conf"
        echo "       udevadm control --reload-rules && udevadm trigger --action=change"
        echo "       systemctl daemon-reload"
    fi
    echo "  $((step++)). Edit $CONFIG_DIR/config.toml: set [stores] ids, and [tls], [auth], [hq]"
    echo "     and [[devices]] as needed. Compare with $PREFIX/config.toml.example after upgrades."
    echo "  $((step++)). Put the gateway API keys and the HQ token into $CONFIG_DIR/keys/"
    echo "     and TLS files into $CONFIG_DIR/tls/, owned by root:$SERVICE_GROUP, mode 0640:"
    echo "       install -m 0640 -g $SERVICE_GROUP gateway-1 $CONFIG_DIR/keys/gateway-1"
    echo "  $((step++)). Check the configuration:"
    echo "       $PREFIX/venv/bin/identity-connector check-config $CONFIG_DIR/config.toml"
    if [ "$CONFIG_CREATED" = yes ]; then
        echo "  $((step++)). Enable and start the service, then follow its log:"
        echo "       systemctl enable --now identity-connector"
    else
        echo "  $((step++)). Restart the service so that it runs the new program, then follow its log:"
        echo "       systemctl restart identity-connector"
    fi
    echo "       journalctl -u identity-connector -f"
}

check_python
install_program
install_system_files
install_config
if [ -z "$DESTDIR" ]; then
    activate
fi
print_next_steps
