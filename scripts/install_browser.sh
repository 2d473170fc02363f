#!/usr/bin/env bash
# Installs what tests/test_serve_browser.py drives: Debian's Chromium (and its chromedriver),
# plus the Playwright Python package, which then runs /usr/bin/chromium (never its own download).
# Usage: scripts/install_browser.sh [python]   (default: .venv/bin/python, else python3)
set -euo pipefail

if [ ! -x /usr/bin/chromium ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y chromium chromium-driver
fi

python="${1:-}"
if [ -z "$python" ]; then
    if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; fi
fi
if ! "$python" -c "import playwright" 2>/dev/null; then
    "$python" -m pip install "playwright>=1.40"
fi
/usr/bin/chromium --version
