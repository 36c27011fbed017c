package config

import _ "embed"

//go:embed example.yaml
var example string

// Example returns the commented example configuration (the seed host's:
// DATA/libvirt, 20 snapshots, managed save, an ssh replica, kopia with zstd).
// "vmhistory config example" prints it and the README includes it; a test
// keeps it valid.
func Example() string { return example }
