#!/usr/bin/env bash
# Install the operations tools the deploy tests need, from Debian's packages, when they are missing:
#   prometheus              -> promtool and the prometheus server (rule/config checks, rule unit tests, panel queries)
#   prometheus-alertmanager -> amtool (alertmanager.yml check)
#   docker-compose          -> `docker-compose config` (docker-compose.yml validation; no Docker engine needed)
# Idempotent and quiet: does nothing when every tool is on PATH. Never fails the build by itself: when apt is not
# available (not root, not Debian, offline) it says so once and exits 0; tests/test_deploy*.py then fail under CI=true
# and skip with the reason elsewhere.
set -u

need=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v amtool >/dev/null 2>&1 || need+=(prometheus-alertmanager)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)

if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure-prometheus: apt-get not found; install ${need[*]} by hand (deploy tests need them)" >&2
    exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo=(sudo -n)
    else
        echo "ensure-prometheus: not root and no passwordless sudo; install ${need[*]} by hand" >&2
        exit 0
    fi
fi

export DEBIAN_FRONTEND=noninteractive
echo "ensure-prometheus: installing ${need[*]}" >&2
# Package scripts must not try to start daemons (no init system in containers/CI): policy-rc.d says "denied".
# Leave any existing policy alone.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ] && [ "$(id -u)" -eq 0 ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && made_policy=1
fi
log=$(mktemp)
status=0
if ! "${sudo[@]}" apt-get update -qq >"$log" 2>&1; then
    echo "ensure-prometheus: apt-get update failed:" >&2
    tail -n 5 "$log" >&2
    status=1
elif ! "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >"$log" 2>&1; then
    echo "ensure-prometheus: apt-get install ${need[*]} failed:" >&2
    tail -n 5 "$log" >&2
    status=1
fi
rm -f "$log"
if [ "$made_policy" -eq 1 ]; then
    rm -f "$policy"
fi
# Debian's packages may start the daemons when an init system is present; the tests start their own on loopback.
if [ "$status" -eq 0 ]; then
    for tool in promtool prometheus amtool docker-compose; do
        command -v "$tool" >/dev/null 2>&1 || echo "ensure-prometheus: $tool still missing after install" >&2
    done
fi
exit 0
