#!/usr/bin/env bash
# Container entry point. `start` (the default command): check the kit and this machine with
# `fedbrain site check`, then run the kit's sub_start.sh in the foreground (it supervises FLARE;
# start.sh would background it and the container would exit). Any other command runs as given
# (fedbrain, nvflare, bash), without the check.
set -euo pipefail
KIT="${FEDBRAIN_KIT:-/kit}"
if [[ "${1:-start}" != "start" ]]; then
  exec "$@"
fi
if [[ ! -f "$KIT/startup/sub_start.sh" ]]; then
  echo "fedbrain: no kit at $KIT: mount the participant's kit folder there read-only (-v /srv/flare/hospital-a:$KIT:ro)" >&2
  exit 2
fi
# A server that is down is a warning only (FLARE keeps retrying); anything that fails stops here,
# with the reason in `docker logs`. FEDBRAIN_CHECK_ARGS adds options (e.g. --need-gpu-gib 16).
# shellcheck disable=SC2086
fedbrain site check --kit "$KIT" --workspace "${NVFL_WORKSPACE:-/workspace}" --allow-server-down --no-preflight \
  ${FEDBRAIN_CHECK_ARGS:-}
exec "$KIT/startup/sub_start.sh"
