#!/usr/bin/env bash
# Idempotent: installs Debian's Chromium (/usr/bin/chromium) for the browser test of task=app (tests/test_app.py,
# driven by Playwright's Python package with executable_path=/usr/bin/chromium). Does nothing when it is there.
# Needs root and apt (Debian / Ubuntu). Never `playwright install`: it downloads a browser build of its own, which
# this project's machines cannot fetch.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "setup_browser.sh: /usr/bin/chromium is missing; run this script as root (it installs Debian's chromium with apt-get)." >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_browser.sh: /usr/bin/chromium is missing and apt-get is not available: install Chromium at /usr/bin/chromium by hand." >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq chromium
test -x /usr/bin/chromium
echo "setup_browser.sh: $(/usr/bin/chromium --version 2>/dev/null || echo chromium) installed at /usr/bin/chromium"
