#!/bin/sh
# Entrypoint of an executor that runs tenant programs isolated (compose.isolated.yaml,
# k8s/executor-isolated.yaml). A container's cgroup file system is mounted read-only
# unless the container is privileged; with CAP_SYS_ADMIN and no AppArmor confinement
# the executor may remount its own (namespaced) view read-write, so it can make one
# cgroup per sandbox under its own cgroup. Nothing else changes; then the executor.
set -eu
for point in $(awk '$3 == "cgroup" || $3 == "cgroup2" { print $2 }' /proc/self/mounts); do
    mount -o remount,rw "$point" 2>/dev/null || echo "qrelay: cannot remount $point read-write" >&2
done
exec qrelay "$@"
