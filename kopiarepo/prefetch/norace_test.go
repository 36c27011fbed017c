//go:build !race

package prefetch_test

const raceEnabled = false
