#!/usr/bin/env bash
# The systemd test harness: runs COMMAND beside a private `systemd --user` manager that
# knows the units in UNIT_DIR; inside COMMAND, `systemctl --user` talks to that manager.
#
#   test/systemd-sandbox.sh UNIT_DIR COMMAND [ARGS...]      exits with COMMAND's status
#
# Needs root, /usr/lib/systemd/systemd, unshare (util-linux) and a writable cgroup file
# system. Environment: SANDBOX_DIR (the manager's home, XDG directories and manager.log;
# default: a new directory under /tmp, kept for reading afterwards), SANDBOX_TIMEOUT
# (seconds before everything is killed, default 120), SANDBOX_LOGLEVEL (default info),
# SANDBOX_NODE (the node binary of the journal, default: node on PATH).
#
# Nothing of the machine's own systemd is touched. Everything runs in a new PID and mount
# namespace, so that killing its first process ends every service the manager started;
# the manager gets a cgroup subtree of its own, where it creates the cgroups of its units;
# /run/systemd is a private tmpfs with the sockets of the journal, served by
# test/systemd-journal.js, which appends the manager's log and the services' output to
# manager.log.
set -euo pipefail
SYSTEMD=/usr/lib/systemd/systemd
SELF=$(readlink -f "$0")

die() { echo "systemd-sandbox: $*" >&2; exit 2; }

# The cgroup hierarchies systemd keeps its units in: the unified one, and on a legacy or
# hybrid machine the named "systemd" hierarchy too.
cgroup_bases() {
  if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
    echo /sys/fs/cgroup
    return
  fi
  [ "$(stat -fc %T /sys/fs/cgroup/unified 2>/dev/null)" = cgroup2fs ] && echo /sys/fs/cgroup/unified
  [ -d /sys/fs/cgroup/systemd ] && echo /sys/fs/cgroup/systemd
  return 0
}

join_cgroup() { # join_cgroup LEAF: moves the calling shell into LEAF of every subtree
  local group
  for group in $GROUPS_OF_SANDBOX; do echo $BASHPID >"$group/$1/cgroup.procs"; done
}

if [ "${1:-}" = --inside ]; then
  # PID 1 of the new namespace: when it exits, the kernel kills everything left in it.
  shift
  join_cgroup outside-manager
  mkdir -p /run/systemd
  mount -t tmpfs -o mode=0755 sandbox-run-systemd /run/systemd
  mkdir /run/systemd/system /run/systemd/journal # "booted with systemd", and the journal
  # The manager must never write to the machine's console.
  [ ! -e /dev/console ] || mount --bind /dev/null /dev/console
  export HOME=$WORK/home XDG_RUNTIME_DIR=$WORK/run XDG_CONFIG_HOME=$WORK/config \
    XDG_DATA_HOME=$WORK/data XDG_STATE_HOME=$WORK/state XDG_CACHE_HOME=$WORK/cache
  unset DBUS_SESSION_BUS_ADDRESS DBUS_SYSTEM_BUS_ADDRESS NOTIFY_SOCKET LISTEN_FDS LISTEN_PID LISTEN_FDNAMES
  "$NODE_FOR_JOURNAL" "$(dirname "$SELF")/systemd-journal.js" /run/systemd/journal "$WORK/manager.log" &
  until [ -S /run/systemd/journal/socket ] && [ -S /run/systemd/journal/stdout ]; do
    kill -0 $! 2>/dev/null || die "the journal did not start"
    sleep 0.05
  done
  (
    join_cgroup manager
    exec "$SYSTEMD" --user --unit=sandbox.target --log-target=journal \
      --log-level="${SANDBOX_LOGLEVEL:-info}" </dev/null >>"$WORK/manager.log" 2>&1
  ) &
  manager=$!
  # Ready once its private bus socket answers and the start-up job is done.
  until [ -S "$XDG_RUNTIME_DIR/systemd/private" ] &&
    [[ "$(systemctl --user is-system-running --wait 2>/dev/null)" =~ ^(running|degraded)$ ]]; do
    kill -0 $manager 2>/dev/null || die "the manager ended during start-up; see $WORK/manager.log"
    sleep 0.05
  done
  status=0
  "$@" || status=$?
  # A clean stop: the services get their stop signal and may write their state back.
  systemctl --user exit >/dev/null 2>&1 || kill -TERM $manager 2>/dev/null || true
  wait $manager || true
  exit $status
fi

[ $# -ge 2 ] || die "usage: systemd-sandbox.sh UNIT_DIR COMMAND [ARGS...]"
[ "$(id -u)" = 0 ] || die "needs root (PID and mount namespaces, cgroups)"
[ -x "$SYSTEMD" ] || die "needs $SYSTEMD"
UNITS=$1
shift
[ -d "$UNITS" ] || die "no unit directory $UNITS"
WORK=$(readlink -f "${SANDBOX_DIR:-$(mktemp -d /tmp/shmfd-systemd-sandbox.XXXXXX)}")
mkdir -p "$WORK"/home "$WORK"/run "$WORK"/config/systemd/user "$WORK"/data "$WORK"/state "$WORK"/cache
chmod 0700 "$WORK/run"
cp -- "$UNITS"/* "$WORK/config/systemd/user/"
# The manager starts this empty target instead of default.target and what it pulls in.
cat >"$WORK/config/systemd/user/sandbox.target" <<'UNIT'
[Unit]
Description=Start target of the systemd test sandbox
DefaultDependencies=no
UNIT

GROUPS_OF_SANDBOX=
for base in $(cgroup_bases); do GROUPS_OF_SANDBOX="$GROUPS_OF_SANDBOX $base/shmfd-sandbox-$$"; done
[ -n "$GROUPS_OF_SANDBOX" ] || die "no cgroup hierarchy for systemd under /sys/fs/cgroup"
created=
remove_groups() {
  local group tries
  for group in $created; do
    # The namespace's processes were killed; their cgroups empty as they are reaped.
    for tries in $(seq 100); do
      [ -d "$group" ] || break
      find "$group" -depth -type d -exec rmdir {} + 2>/dev/null || sleep 0.05
    done
    [ ! -d "$group" ] || echo "systemd-sandbox: could not remove $group" >&2
  done
}
trap remove_groups EXIT
for group in $GROUPS_OF_SANDBOX; do
  mkdir "$group" || die "cannot create the cgroup $group"
  created="$created $group"
  mkdir "$group/outside-manager" "$group/manager"
done

export GROUPS_OF_SANDBOX WORK NODE_FOR_JOURNAL=${SANDBOX_NODE:-node}
timeout --kill-after=5 "${SANDBOX_TIMEOUT:-120}" \
  unshare --pid --mount --mount-proc --propagation private --kill-child \
  bash "$SELF" --inside "$@" <&0 & # (a job in the background would read /dev/null)
inner=$!
# Stopping the harness stops the namespace (unshare --kill-child takes its first process).
trap 'kill -TERM $inner 2>/dev/null' TERM INT HUP
status=0
wait $inner || status=$?
while kill -0 $inner 2>/dev/null; do wait $inner || status=$?; done
[ $status = 0 ] || echo "systemd-sandbox: exit $status; manager log: $WORK/manager.log" >&2
exit $status
