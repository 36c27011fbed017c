// Command churn rewrites a fraction of a file in 64 KiB blocks of random
// bytes at random 64 KiB-aligned offsets, as a night of a VM writes its
// disk: churn FILE FRACTION [SEED].
package main

import (
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: churn FILE FRACTION [SEED]")
		os.Exit(2)
	}
	frac, err := strconv.ParseFloat(os.Args[2], 64)
	if err != nil || frac <= 0 || frac > 1 {
		fmt.Fprintf(os.Stderr, "churn: fraction %q: want a number in (0, 1]\n", os.Args[2])
		os.Exit(2)
	}
	seed := uint64(1)
	if len(os.Args) > 3 {
		if seed, err = strconv.ParseUint(os.Args[3], 10, 64); err != nil {
			fmt.Fprintf(os.Stderr, "churn: seed %q: %v\n", os.Args[3], err)
			os.Exit(2)
		}
	}
	f, err := os.OpenFile(os.Args[1], os.O_RDWR, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, "churn:", err)
		os.Exit(1)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		fmt.Fprintln(os.Stderr, "churn:", err)
		os.Exit(1)
	}
	const block = 64 << 10
	blocks := fi.Size() / block
	n := int64(float64(blocks) * frac)
	rng := rand.New(rand.NewPCG(seed, uint64(fi.ModTime().UnixNano())))
	buf := make([]byte, block)
	for i := int64(0); i < n; i++ {
		for j := range buf {
			buf[j] = byte(rng.Uint32())
		}
		if _, err := f.WriteAt(buf, rng.Int64N(blocks)*block); err != nil {
			fmt.Fprintln(os.Stderr, "churn:", err)
			os.Exit(1)
		}
	}
	if err := f.Sync(); err != nil {
		fmt.Fprintln(os.Stderr, "churn:", err)
		os.Exit(1)
	}
	fmt.Fprintf(os.Stderr, "churn: rewrote %d blocks of 64 KiB (%.1f%%) of %s\n", n, frac*100, os.Args[1])
}
