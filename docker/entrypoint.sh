#!/usr/bin/env bash
# Container entry point. `start` (the default command): check the kit and this machine with
# `fedbrain site check`, then run the kit's sub_start.sh in the foreground (it supervises FLARE;
# start.sh would background it and the container would exit). Any other command runs as given
# (fedbrain, nvflare, bash), without the check.
set -euo pipefail
KIT="${FEDBRAIN_KIT:-/kit}"
# Kubernetes (fedbrain kit k8s) mounts the kit as a Secret at FEDBRAIN_KIT_FROM: symlinks into a hidden
# folder, group-readable under the pod's fsGroup. Copy startup/ and local/ into $KIT (a memory volume),
# readable by this user only, as the kit check and FLARE expect of a kit.
if [[ -n "${FEDBRAIN_KIT_FROM:-}" ]]; then
  if [[ ! -d "$FEDBRAIN_KIT_FROM/startup" ]]; then
    echo "fedbrain: no kit at $FEDBRAIN_KIT_FROM: create the kit's Secret (kit-secret.yaml from fedbrain kit k8s) before the pod starts" >&2
    exit 2
  fi
  (umask 077 && cp -rL "$FEDBRAIN_KIT_FROM/startup" "$FEDBRAIN_KIT_FROM/local" "$KIT/")
  chmod -R u+rwX,go-rwx "$KIT/startup" "$KIT/local"
  chmod u+x "$KIT"/startup/*.sh
fi
if [[ "${1:-start}" != "start" ]]; then
  exec "$@"
fi
if [[ ! -f "$KIT/startup/sub_start.sh" ]]; then
  echo "fedbrain: no kit at $KIT: mount the participant's kit folder there read-only (-v /srv/flare/hospital-a:$KIT:ro)" >&2
  exit 2
fi
# The container starts with nothing of FLARE running in it: pid files on the workspace volume are from its
# previous life (killed, restarted by Docker or Kubernetes, the host rebooted). FLARE's sub_start.sh would find its
# own stale daemon_pid.fl naming PID 1, which is alive again (this script), and exit without starting FLARE.
WORKSPACE="${NVFL_WORKSPACE:-/workspace}"
rm -f "$WORKSPACE/daemon_pid.fl" "$WORKSPACE/pid.fl" "$WORKSPACE/shutdown.fl" "$WORKSPACE/restart.fl"
# A server that is down is a warning only (FLARE keeps retrying); anything that fails stops here,
# with the reason in `docker logs`. FEDBRAIN_CHECK_ARGS adds options (e.g. --need-gpu-gib 16).
# shellcheck disable=SC2086
fedbrain site check --kit "$KIT" --workspace "$WORKSPACE" --allow-server-down --no-preflight \
  ${FEDBRAIN_CHECK_ARGS:-}
# PID 1 of a container has no default action for SIGTERM: without a handler `docker stop` and a pod's end wait out
# their grace period, then kill FLARE mid-write. On TERM or INT: tell sub_start.sh's loop to stop (shutdown.fl, as
# FLARE's own shutdown does), TERM the FLARE process it supervises (pid.fl), and wait for the loop to end.
"$KIT/startup/sub_start.sh" &
supervisor=$!
stop() {
  touch "$WORKSPACE/shutdown.fl"
  if [[ -f "$WORKSPACE/pid.fl" ]]; then
    kill -TERM "$(cat "$WORKSPACE/pid.fl")" 2>/dev/null || true
  fi
  wait "$supervisor" || true
  exit 0
}
trap stop TERM INT
status=0
wait "$supervisor" || status=$?
exit "$status"
