#!/usr/bin/env bash
# Healthy while the FLARE process that the kit's sub_start.sh supervises is alive (its pid.fl).
pid="$(cat "${NVFL_WORKSPACE:-/workspace}/pid.fl" 2>/dev/null)" && [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
