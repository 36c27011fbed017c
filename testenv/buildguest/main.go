// Command buildguest builds (or finds in its cache) the real test guest's
// kernel and initramfs, for scripts (make demo) that start guests like the
// tests do.
//
//	buildguest                        prints the kernel's and the initramfs's paths, one a line
//	buildguest xml NAME DISK CONSOLE  prints the guest's domain XML
package main

import (
	"fmt"
	"os"

	"github.com/vmhistory/vmhistory/testenv"
)

func main() {
	boot, err := testenv.BuildGuestImage()
	if err != nil {
		fmt.Fprintf(os.Stderr, "buildguest: %v\n", err)
		os.Exit(1)
	}
	switch {
	case len(os.Args) == 1:
		fmt.Println(boot.Kernel)
		fmt.Println(boot.Initrd)
	case len(os.Args) == 5 && os.Args[1] == "xml":
		fmt.Print(testenv.GuestXML(os.Args[2], boot, os.Args[3], os.Args[4]))
	default:
		fmt.Fprintln(os.Stderr, "usage: buildguest [xml NAME DISK CONSOLE]")
		os.Exit(2)
	}
}
