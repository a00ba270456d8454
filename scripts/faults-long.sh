#!/usr/bin/env bash
# A long run of the thin pool's fault-injecting model tests (make faults-long): TestModelFaults,
# TestModelAsyncFaults and TestModelSnapshotsCrashPoints, each over FAULT_SEEDS seeds from
# FAULT_SEED, of FAULT_STEPS steps (empty: each test's default). CI runs 3 seeds of each; this
# is the run to do before trusting a change to the commit, release or fault paths.
#
# Prints, per test, seeds x steps, passes, failures (with the command that replays each failed
# seed) and what the faults exercised; full logs go to $THINBLK_BUILD/faults-long (default
# _build/faults-long). Exits non-zero if any seed failed.
set -uo pipefail

seeds=${FAULT_SEEDS:-500}
first=${FAULT_SEED:-1}
steps=${FAULT_STEPS:-}
go=${GO:-go}
root=$(cd "$(dirname "$0")/.." && pwd)
out=${THINBLK_BUILD:-$root/_build}/faults-long
mkdir -p "$out"

# One binary for the whole run: the tests then cost only their own time.
(cd "$root" && "$go" test -c -o "$out/thin.test" ./thin) || exit 1
cd "$root/thin" || exit 1

rc=0
for t in TestModelFaults TestModelAsyncFaults TestModelSnapshotsCrashPoints; do
	log=$out/$t.log
	start=$(date +%s)
	env THIN_MODEL_SEED="$first" THIN_MODEL_SEEDS="$seeds" ${steps:+THIN_MODEL_STEPS=$steps} \
		"$out/thin.test" -test.run "^$t\$" -test.count=1 -test.v -test.timeout 0 >"$log" 2>&1
	status=$?
	pass=$(grep -c -- "--- PASS: $t/seed=" "$log")
	fail=$(grep -c -- "--- FAIL: $t/seed=" "$log")
	echo "$t: seeds $first..$((first + seeds - 1)) x ${steps:-default} steps: $pass passed, $fail failed ($(($(date +%s) - start)) s; log $log)"
	grep -E 'faults fired|crash clones checked' "$log" | sed 's/^ */  /'
	for seed in $(grep -o -- "--- FAIL: $t/seed=[0-9]*" "$log" | sed 's/.*seed=//'); do
		# The seed's first message (go test -v prints it under the seed's RUN line).
		awk -v run="=== RUN   $t/seed=$seed" '$0 == run { on = 1; next } on && /^(===|---)/ { exit } on && n < 2 { print "  " substr($0, 1, 300); n++ }' "$log"
		echo "  replay: THIN_MODEL_SEED=$seed ${steps:+THIN_MODEL_STEPS=$steps }go test -count=1 -run '^$t\$' -v ./thin"
	done
	if [ "$status" -ne 0 ] || [ "$fail" -ne 0 ] || [ "$pass" -ne "$seeds" ]; then
		[ "$fail" -eq 0 ] && tail -20 "$log"
		rc=1
	fi
done
exit $rc
