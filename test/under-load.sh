#!/usr/bin/env bash
# `npm test` three times in a row while two CPU-bound processes run beside it: the suite
# must not depend on the machine's speed. Exits non-zero when any run fails.
#
#   npm run test:load            (RUNS=N for another number of runs)
set -u
cd "$(dirname "$0")/.."
burners=()
stop_burners() {
  [ ${#burners[@]} -eq 0 ] || kill "${burners[@]}" 2>/dev/null
  wait 2>/dev/null
}
trap stop_burners EXIT
trap 'exit 130' INT TERM
for _ in 1 2; do
  node -e 'for (;;);' &
  burners+=($!)
done
failed=()
runs=${RUNS:-3}
for run in $(seq "$runs"); do
  echo "== test:load: npm test, run $run of $runs, beside two CPU-bound processes (pids ${burners[*]})"
  npm test || failed+=("$run")
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "== test:load: run(s) ${failed[*]} of $runs failed" >&2
  exit 1
fi
echo "== test:load: $runs of $runs runs passed"
