#!/usr/bin/env bash
# Run a command inside the audiohash environment (set up on first use): scripts/with-env.sh CMD ...
source "$(dirname "${BASH_SOURCE[0]}")/bootstrap.sh"
exec "$@"
