#!/bin/sh
# The image's entrypoint. Runs attach to the RayCluster as Ray drivers (AVP_RAY_ADDRESS, the head's
# GCS address), and a driver runs on a node of its cluster: a run pod (AVP_JOIN_RAY=1, set by the
# run launcher in dagster-values.yaml) first joins as a node that offers no CPUs or GPUs, so Ray
# schedules nothing of the cluster's on it. The code server, and the Ray nodes (KubeRay sets
# their command), do not join.
set -e
if [ "${AVP_JOIN_RAY:-0}" = "1" ] && [ -n "${AVP_RAY_ADDRESS:-}" ]; then
  ray start --address="$AVP_RAY_ADDRESS" --num-cpus=0 --num-gpus=0
fi
exec "$@"
