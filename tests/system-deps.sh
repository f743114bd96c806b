#!/usr/bin/env bash
# Install the Debian packages the test suite needs: the PC/SC stack with a
# virtual reader, the compiler and headers pyscard and evdev build with, and
# systemd-analyze for the unit checks. Installs only what is missing, so a
# second run costs a few dpkg queries.
set -euo pipefail

PACKAGES=(
    build-essential
    python3-dev
    pcscd
    vsmartcard-vpcd
    libpcsclite-dev
    swig
    pkg-config
    linux-libc-dev
    systemd
    socat
)

missing=()
for package in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$package")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    echo "error: missing Debian packages: ${missing[*]}" >&2
    echo "Run 'sudo apt-get install ${missing[*]}' and try again." >&2
    exit 1
fi

echo "Installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
