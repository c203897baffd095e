#!/usr/bin/env bash
# Create the secret files docker-compose.yml mounts, when missing. Never overwrites an existing file.
set -euo pipefail
dir="$(cd "$(dirname "$0")/../secrets" && pwd)"
umask 077
made=()
make_secret() {
    local name=$1 value=$2
    if [ ! -s "$dir/$name" ]; then
        printf '%s\n' "$value" >"$dir/$name"
        made+=("$name")
    fi
}
make_secret slack_token "xoxb-placeholder-set-a-real-bot-token"
make_secret smtp_password "placeholder-unused-without-smtp-username"
make_secret grafana_admin_password "$(head -c 18 /dev/urandom | base64 | tr -d '/+=')"
if [ ${#made[@]} -gt 0 ]; then
    echo "created deploy/secrets/{$(IFS=,; echo "${made[*]}")} (mode 0600)."
    echo "The containers read them as other users: see deploy/secrets/README.md (chown 10001 / 472)."
else
    echo "deploy/secrets: every secret file already exists"
fi
