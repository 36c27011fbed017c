#!/usr/bin/env bash
# Runs every fuzz target of the module (each "func FuzzX" in a _test.go
# file) for FUZZTIME (default 30s) with its checked-in seeds, one
# "go test -fuzz" per target as the go tool requires. A failing input is
# written to the package's testdata/fuzz/ and the script exits 1: commit
# that file with the fix, it is a regression seed from then on.
set -euo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
FUZZTIME=${FUZZTIME:-30s}

targets=$(grep -rHo --include='*_test.go' '^func Fuzz[A-Za-z0-9_]*' . | sed -e 's|^\./||' -e 's|/[^/]*_test.go:func | |' | sort -u)
[ -n "$targets" ] || { echo "fuzz: no fuzz targets found" >&2; exit 1; }
n=0
while read -r dir fn; do
	n=$((n + 1))
	echo "fuzz: $fn in ./$dir for $FUZZTIME"
	"$GO" test -run '^$' -fuzz "^${fn}\$" -fuzztime "$FUZZTIME" -fuzzminimizetime 5s "./$dir" 2>&1 | grep -v '^fuzz: elapsed' || exit 1
done <<<"$targets"
echo "fuzz: $n targets passed"
