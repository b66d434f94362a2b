#!/bin/sh
# Make sure headless Chromium is available for the review page's browser test
# (tests/test_review.py::TestInBrowser) and for scripts/make_examples.py.
#
# Finds `chromium` (Debian) or `chromium-browser` on PATH; otherwise, when running as root
# on a system with apt-get, installs Debian's `chromium` package. Anything else: says how
# to install it and exits 1. Exit 0 means `chromium --headless` can be run.
set -eu

find_chromium() {
    for name in chromium chromium-browser; do
        if command -v "$name" >/dev/null 2>&1; then
            command -v "$name"
            return 0
        fi
    done
    return 1
}

if path=$(find_chromium); then
    echo "chromium: $path ($("$path" --version 2>/dev/null || echo 'version unknown'))"
    exit 0
fi

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "chromium not found; installing Debian's chromium package with apt-get" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq chromium >/dev/null
    if path=$(find_chromium); then
        echo "chromium: $path ($("$path" --version 2>/dev/null || echo 'version unknown'))"
        exit 0
    fi
    echo "apt-get installed chromium but no chromium binary is on PATH" >&2
    exit 1
fi

cat >&2 <<'MSG'
chromium is not installed, and this script can install it only as root with apt-get.
Install it yourself, then run the tests again:
  Debian / Ubuntu:  sudo apt-get update && sudo apt-get install -y chromium
                    (Ubuntu's package may be named chromium-browser)
  Fedora:           sudo dnf install chromium
Without it the review page's browser test is skipped.
MSG
exit 1
