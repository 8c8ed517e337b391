#!/usr/bin/env bash
# Install Debian's Chromium and ChromeDriver for the report's browser test when they are missing.
# Never fails the build: where they cannot be installed, the browser test skips and says why.
set -u
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing chromium + chromium-driver for the report browser test (Debian packages)..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
    || echo "could not install chromium; the browser test will be skipped" >&2
else
  echo "chromium not found and not installable here (needs root and apt-get); the browser test will be skipped" >&2
fi
exit 0
