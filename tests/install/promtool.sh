#!/usr/bin/env bash
# Makes sure the chart's alerting rules can be checked: promtool, from the
# Debian package of Prometheus (2.42 on Debian 12), when the machine has none.
# Its service is not started (no init system is asked to).
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
  exit 0
fi
echo "promtool not found: installing Debian's prometheus package for it"
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "promtool.sh: need root or sudo to apt-get install prometheus" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
# The package's scripts would start the server: keep any init system out of it.
policy=/usr/sbin/policy-rc.d
created_policy=""
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
  $sudo chmod 755 "$policy"
  created_policy=1
fi
trap '[ -n "$created_policy" ] && $sudo rm -f "$policy"' EXIT
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends prometheus >/dev/null
promtool --version | head -1
