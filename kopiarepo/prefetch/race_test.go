//go:build race

package prefetch_test

// raceEnabled: the race detector slows CPU-bound work (decryption,
// hashing) by an order of magnitude, so wall-clock bounds are not checked.
const raceEnabled = true
