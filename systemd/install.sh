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
#            which must be 3.11 or newer; Debian needs python3-venv). The
#            service runs it as its own user, so without DESTDIR the script
#            stops when that user cannot run it.
#
# Layout, chosen because this is software installed by the administrator and
# not by a Debian package (dpkg owns /usr/lib):
#   /opt/identity-connector/venv                      program (virtual environment)
#   /opt/identity-connector/config.toml.example       newest configuration template
#   /opt/identity-connector/uninstall.sh              uninstaller
#   /opt/identity-connector/README.md, docs/          documentation
#   /etc/systemd/system/identity-connector.service    unit
#   /etc/sysusers.d/identity-connector.conf           system user
#   /etc/tmpfiles.d/identity-connector.conf           modes of config and keys
#   /etc/udev/rules.d/99-identity-connector.rules     scanner access and names
#   /etc/identity-connector/config.toml               configuration, never overwritten
#
# Running it again upgrades the program and the files above, except
# config.toml. It rebuilds the virtual environment when that runs another
# interpreter or Python version than PYTHON, or differs in
# --system-site-packages. It neither starts nor restarts the service. The
# checkout is only read: the project is built from a temporary copy.
set -euo pipefail

usage() {
    cat <<EOF
Usage: systemd/install.sh [OPTIONS]

Install Identity Connector into ${DESTDIR:-}/opt/identity-connector and its
systemd, sysusers, tmpfiles and udev files into ${DESTDIR:-}/etc.

Environment: DESTDIR installs below that folder and runs nothing on the host;
PYTHON names the interpreter for the virtual environment (3.11 or newer, and
one that the service user can run, such as /usr/bin/python3.11).

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
SERVICE_USER=identity-connector
SERVICE_GROUP=identity-connector

wheel_dir=""
extras=""
system_site_packages=false
venv_options=()
pip_options=()

parse_options() {
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
                system_site_packages=true
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
}

# Checks the version and venv module of $PYTHON and sets four variables.
# PYTHON_EXECUTABLE is the interpreter that a virtual environment made by
# $PYTHON links to, which is the base interpreter when $PYTHON is inside a
# virtual environment itself. PYTHON_REALPATH is that file with symlinks
# resolved, PYTHON_PREFIX its installation folder and PYTHON_VERSION its
# major.minor version.
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

    local facts
    # The venv module links the new environment's python to
    # sys._base_executable (read in Python 3.11.7, 3.12.1 and 3.13.0).
    facts=$("$PYTHON" -c '
import os, sys
executable = getattr(sys, "_base_executable", sys.executable)
print(executable)
print(os.path.realpath(executable))
print(os.path.realpath(sys.base_prefix))
print("%d.%d" % sys.version_info[:2])
')
    {
        read -r PYTHON_EXECUTABLE
        read -r PYTHON_REALPATH
        read -r PYTHON_PREFIX
        read -r PYTHON_VERSION
    } <<<"$facts"
}

print_python_fix() {
    echo "Use a Python 3.11 or newer that every user can run, outside /home, /root," \
        "/run/user, /tmp and /var/tmp, such as Debian's (apt-get install python3-venv):" >&2
    echo "  PYTHON=/usr/bin/python3.11 ${BASH_SOURCE[0]}" >&2
}

# Stops the installation unless the service can run the interpreter that the
# virtual environment will link to. Call check_python first.
check_service_can_run_python() {
    # The service user exists from the first install on. Before that, the
    # check runs as the user nobody. Neither user is root or has
    # supplementary groups, so the modes of the interpreter's files treat
    # them alike.
    local user=$SERVICE_USER
    local who="the service user $SERVICE_USER"
    if ! id -u "$user" >/dev/null 2>&1; then
        user=nobody
        who="the user nobody (checked in place of the service user $SERVICE_USER,"
        who+=" which does not exist yet)"
        if ! id -u "$user" >/dev/null 2>&1; then
            echo "warning: neither $SERVICE_USER nor nobody exists, so whether the service" \
                "user can run $PYTHON_EXECUTABLE was not checked" >&2
            user=""
        fi
    fi
    if [ -n "$user" ] && ! command -v runuser >/dev/null; then
        echo "warning: runuser (util-linux) is missing, so whether the service user" \
            "can run $PYTHON_EXECUTABLE was not checked" >&2
        user=""
    fi

    # runuser, not setpriv: with util-linux 2.38, setpriv --reuid=nobody
    # started an interpreter below /root (mode 0700) that runuser -u nobody,
    # like the service, cannot start ("Permission denied").
    local output
    if [ -n "$user" ] && ! output=$(runuser -u "$user" -- "$PYTHON_EXECUTABLE" -I -c '' 2>&1); then
        echo "error: $who cannot run $PYTHON_EXECUTABLE (PYTHON=$PYTHON):" >&2
        printf '  %s\n' "$output" >&2
        print_python_fix
        exit 1
    fi

    # The unit sets ProtectHome=yes, which hides /home, /root and /run/user
    # from the service, and PrivateTmp=yes, which gives it an empty /tmp and
    # /var/tmp. An interpreter there fails even when its modes allow access.
    local path hidden
    for path in "$PYTHON_EXECUTABLE" "$PYTHON_REALPATH" "$PYTHON_PREFIX"; do
        for hidden in /home /root /run/user /tmp /var/tmp; do
            case "$path/" in
                "$hidden"/*)
                    echo "error: PYTHON=$PYTHON uses $path, below $hidden, which the service" \
                        "cannot see: its unit sets ProtectHome=yes (hiding /home, /root and" \
                        "/run/user) and PrivateTmp=yes (an empty /tmp and /var/tmp)." >&2
                    print_python_fix
                    exit 1
                    ;;
            esac
        done
    done
}

# Prints why the existing virtual environment $1 does not match the requested
# interpreter and options, or nothing when it matches.
venv_mismatch() {
    local venv=$1
    local config="$venv/pyvenv.cfg"
    local current current_version has_site_packages

    current=$(readlink -f "$venv/bin/python")
    if [ "$current" != "$PYTHON_REALPATH" ]; then
        echo "it runs $current, not $PYTHON_REALPATH (PYTHON=$PYTHON)"
        return
    fi

    # The same path can hold a newer interpreter after an upgrade of the
    # distribution, whose modules the environment's lib/pythonX.Y lacks.
    current_version=$(sed -n 's/^version *= *\([0-9]*\.[0-9]*\).*/\1/p' "$config" 2>/dev/null)
    if [ -n "$current_version" ] && [ "$current_version" != "$PYTHON_VERSION" ]; then
        echo "it was created by Python $current_version, and $PYTHON_EXECUTABLE is $PYTHON_VERSION"
        return
    fi

    has_site_packages=$(sed -n 's/^include-system-site-packages *= *//p' "$config" 2>/dev/null)
    if [ -n "$has_site_packages" ] && [ "$has_site_packages" != "$system_site_packages" ]; then
        if [ "$system_site_packages" = true ]; then
            echo "it was created without --system-site-packages"
        else
            echo "it was created with --system-site-packages"
        fi
    fi
}

# Copies the checkout into a temporary folder, sets BUILD_COPY to it and
# removes it when the script exits. pip builds a project folder in place, and
# setuptools writes build/ and *.egg-info into it. Building the copy keeps the
# checkout unchanged and leaves out an old build/ folder, whose modules
# setuptools would install again even after they were deleted upstream.
copy_source() {
    BUILD_COPY=$(mktemp -d -t identity-connector-build.XXXXXX)
    trap 'rm -rf -- "$BUILD_COPY"' EXIT
    tar -C "$SOURCE_DIR" --exclude-vcs --exclude=./.venv --exclude=./.run --exclude=./tests \
        --exclude=./build --exclude=./dist --exclude='*.egg-info' --exclude=__pycache__ \
        --exclude=./.pytest_cache --exclude=./.ruff_cache --exclude=./.hypothesis \
        -cf - . | tar -C "$BUILD_COPY" -xf -
}

# Creates the virtual environment unless a working one for $PYTHON exists,
# then installs the project into it. An existing environment is upgraded in
# place because a virtual environment cannot be moved: its scripts name their
# own path.
install_program() {
    local venv="$DESTDIR$PREFIX/venv"
    local mismatch=""

    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c '' 2>/dev/null; then
        echo "Creating virtual environment $venv"
        rm -rf "$venv"
        "$PYTHON" -m venv "${venv_options[@]}" "$venv"
    else
        mismatch=$(venv_mismatch "$venv")
    fi
    if [ -n "$mismatch" ]; then
        echo "Rebuilding virtual environment $venv: $mismatch"
        rm -rf "$venv"
        "$PYTHON" -m venv "${venv_options[@]}" "$venv"
    fi

    local pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade)

    echo "Installing identity-connector into $venv"
    if [ -z "$wheel_dir" ]; then
        copy_source
        # pip rebuilds and reinstalls a project given as a directory even when
        # its version is unchanged; dependencies are upgraded only if needed.
        "${pip[@]}" "${pip_options[@]}" "$BUILD_COPY$extras"
    else
        pip+=(--no-index --find-links "$wheel_dir")
        "${pip[@]}" "${pip_options[@]}" "identity-connector$extras"
        # pip keeps an installed wheel of the same version, but two builds of
        # one checkout share the version, so reinstall the project alone.
        "${pip[@]}" --no-deps --force-reinstall identity-connector
    fi

    install -m 0644 "$SYSTEMD_DIR/config.toml" "$DESTDIR$PREFIX/config.toml.example"
    install -m 0755 "$SYSTEMD_DIR/uninstall.sh" "$DESTDIR$PREFIX/uninstall.sh"
}

# Installs README.md and docs/ in the checkout's layout, because their
# relative links need it and the unit's Documentation= names
# docs/operations.md. The old docs/ is removed first, so that a page deleted
# upstream does not stay.
install_docs() {
    local docs="$DESTDIR$PREFIX/docs"
    local path

    install -m 0644 "$SOURCE_DIR/README.md" "$DESTDIR$PREFIX/README.md"
    rm -rf "$docs"
    (cd "$SOURCE_DIR/docs" && find . -type d -print0) | while IFS= read -r -d '' path; do
        install -d -m 0755 "$docs/$path"
    done
    (cd "$SOURCE_DIR/docs" && find . -type f -print0) | while IFS= read -r -d '' path; do
        install -m 0644 "$SOURCE_DIR/docs/$path" "$docs/$path"
    done
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

# /run/systemd/system exists only when systemd is the running init.
systemd_is_running() {
    [ -d /run/systemd/system ]
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
    else
        echo "Skipped reloading the udev rules: udev is not running; it reads them when it starts"
    fi

    if systemd_is_running; then
        systemctl daemon-reload
    else
        echo "Skipped systemctl daemon-reload: systemd is not running (no /run/systemd/system)"
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
    echo "     $PREFIX/README.md describes every setting (\"Configuration reference\")."
    echo "  $((step++)). Put the gateway API keys and the HQ token into $CONFIG_DIR/keys/"
    echo "     and TLS files into $CONFIG_DIR/tls/, owned by root:$SERVICE_GROUP, mode 0640:"
    echo "       install -m 0640 -g $SERVICE_GROUP gateway-1 $CONFIG_DIR/keys/gateway-1"
    echo "  $((step++)). Check the configuration:"
    echo "       $PREFIX/venv/bin/identity-connector check-config $CONFIG_DIR/config.toml"
    if [ -z "$DESTDIR" ] && ! systemd_is_running; then
        # Without a running systemd, daemon-reload was skipped and neither
        # enable --now nor restart can work yet.
        echo "  $((step++)). systemd is not running on this host, so the unit is not loaded yet."
        echo "     Once the host runs systemd as init, load the unit, enable and start the service,"
        echo "     then follow its log:"
        echo "       systemctl daemon-reload"
        echo "       systemctl enable --now identity-connector"
    elif [ "$CONFIG_CREATED" = yes ]; then
        echo "  $((step++)). Enable and start the service, then follow its log:"
        echo "       systemctl enable --now identity-connector"
    else
        echo "  $((step++)). Restart the service so that it runs the new program, then follow its log:"
        echo "       systemctl restart identity-connector"
    fi
    echo "       journalctl -u identity-connector -f"
}

main() {
    parse_options "$@"

    if [ -z "$DESTDIR" ] && [ "$(id -u)" -ne 0 ]; then
        echo "error: installing into / needs root; run it with sudo, or set DESTDIR" >&2
        exit 1
    fi

    # Files are created with the modes given below, not those the umask leaves.
    umask 022

    check_python
    # With DESTDIR the environment is only staged, and the service on the
    # target runs the one that the installer builds there.
    if [ -z "$DESTDIR" ]; then
        check_service_can_run_python
    fi
    install_program
    install_docs
    install_system_files
    install_config
    if [ -z "$DESTDIR" ]; then
        activate
    fi
    print_next_steps
}

# Sourced, as tests/test_install.py does, the script only defines its
# functions. return succeeds only in a sourced file.
if ! (return 0 2>/dev/null); then
    main "$@"
fi
