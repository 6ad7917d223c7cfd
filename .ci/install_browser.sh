#!/usr/bin/env bash
# Install Debian's headless-capable Chromium and its chromedriver for tests/test_web.py (browser test).
# Idempotent and quiet: does nothing when /usr/bin/chromium and /usr/bin/chromedriver are already there.
set -euo pipefail

if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
    exit 0
fi
if [[ "$(id -u)" -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=sudo
    else
        echo "install_browser.sh: need root (or sudo) to apt-get install chromium chromium-driver" >&2
        exit 1
    fi
else
    SUDO=""
fi
export DEBIAN_FRONTEND=noninteractive
log="$(mktemp)"
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium chromium-driver; } >"$log" 2>&1; then
    echo "install_browser.sh: apt-get failed; last lines:" >&2
    tail -n 20 "$log" >&2
    rm -f "$log"
    exit 1
fi
rm -f "$log"
