package main

import (
	"fmt"
	"os"
	"runtime/pprof"
	"syscall"
)

// startProfile writes a CPU profile of the whole command to the file named
// by VMHISTORY_CPUPROFILE, for developers and for bug reports about speed
// ("go tool pprof -top vmhistory FILE"). The returned func ends it.
func startProfile() func() {
	path := os.Getenv("VMHISTORY_CPUPROFILE")
	if path == "" {
		return func() {}
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL|syscall.O_NOFOLLOW, 0o600)
	if err != nil {
		fmt.Fprintf(os.Stderr, "vmhistory: VMHISTORY_CPUPROFILE: %v\n", err)
		return func() {}
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		fmt.Fprintf(os.Stderr, "vmhistory: VMHISTORY_CPUPROFILE: %v\n", err)
		f.Close()
		return func() {}
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}
}
