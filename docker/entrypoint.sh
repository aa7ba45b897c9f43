#!/bin/sh
# Container entry point: lay out the data volume, find its config, run an appliance command.
#
#   docker run -v appliance-data:/var/lib/appliance appliance:cpu            # the watcher
#   docker run ... appliance:cpu run --until 06:00                           # one batch
#   docker run ... appliance:cpu status | pause | resume | config show
#   HEALTHCHECK runs: appliance-entrypoint healthcheck
set -eu

APPLIANCE_HOME="${APPLIANCE_HOME:-/var/lib/appliance}"
APPLIANCE_CACHE="${APPLIANCE_CACHE:-$APPLIANCE_HOME/cache}"
export APPLIANCE_HOME APPLIANCE_CACHE
# Offline, whatever the image was started with: nothing is fetched, weights load as tensors.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export TORCH_FORCE_WEIGHTS_ONLY_LOAD=1

# A config.toml on the volume is used unless APPLIANCE_CONFIG names another one.
if [ -z "${APPLIANCE_CONFIG:-}" ] && [ -f "$APPLIANCE_HOME/config.toml" ]; then
    APPLIANCE_CONFIG="$APPLIANCE_HOME/config.toml"
    export APPLIANCE_CONFIG
fi

if [ "$#" -eq 0 ]; then
    set -- watch
fi

case "$1" in
    healthcheck)
        exec appliance status --health
        ;;
    shell)
        shift
        exec /bin/sh "$@"
        ;;
esac

for dir in inbox done quarantine dataset models cache; do
    if ! mkdir -p "$APPLIANCE_HOME/$dir" 2>/dev/null || [ ! -w "$APPLIANCE_HOME/$dir" ]; then
        echo "appliance: $APPLIANCE_HOME/$dir is not writable by uid $(id -u)." \
             "Give the volume to that user (on the host: chown -R $(id -u) <volume path>)." >&2
        exit 73  # EX_CANTCREAT
    fi
done

exec appliance "$@"
