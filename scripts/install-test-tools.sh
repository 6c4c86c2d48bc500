#!/usr/bin/env bash
# Installs the system tools some tests use and skip without (they say so):
# Debian's prometheus package, for promtool and a real Prometheus server
# scraping the daemon (tests/observability.rs). Needs root for apt-get;
# does nothing when both are there already. .ci/run calls it.
set -euo pipefail
if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install-test-tools: not root: skipping apt-get install prometheus (the Prometheus test will skip)" >&2
  exit 0
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The package starts no server here (no systemd); the tests start their own.
echo "install-test-tools: $(promtool --version 2>&1 | head -1)"
