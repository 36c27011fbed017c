package config

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

// FuzzParse: any bytes either parse into a configuration whose resolved
// form parses back to itself, or give *Errors whose every problem is one
// line; never a panic.
func FuzzParse(f *testing.F) {
	f.Add([]byte(Example()))
	f.Add([]byte("datasets: [DATA/libvirt]\n"))
	f.Add([]byte("datasets:\n  - name: DATA/a\n    vms: [web, db]\n    replica_dataset: BACKUP/a\n  - DATA/b\nreplica:\n  target: ssh://root@host:2222/BACKUP\nkeep_local: 3\nkeep_replica: 5\n"))
	f.Add([]byte("datasets: [DATA/libvirt]\nquiesce: {mode: fsfreeze, save_timeout: 1h30m}\nvms: all\nsnapshot_format: \"2006-01-02_15:04:05\"\n"))
	f.Add([]byte("datasets: [DATA/libvirt]\nkopia:\n  config_file: /k\n  password_file: /p\n  compression: lz4\n  splitter: FIXED-128K\n"))
	f.Add([]byte("a: &x [1]\nb: *x\ndatasets: *x\n"))
	f.Add([]byte("datasets: [\"DATA/\\u0000\"]\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		// The fuzzer has no time limit per input: a hang would end the run
		// without naming the input, a crash of the worker names it.
		hang := time.AfterFunc(5*time.Second, func() { panic(fmt.Sprintf("Parse takes over 5 s on %q", data)) })
		defer hang.Stop()
		opts := Options{SkipFileChecks: true}
		cfg, err := opts.Parse(data, "fuzz.yaml")
		if err != nil {
			var problems *Errors
			if !errors.As(err, &problems) {
				t.Fatalf("error is %T, not *Errors: %v", err, err)
			}
			for _, line := range problems.Lines() {
				if strings.Contains(line, "\n") {
					t.Fatalf("a problem spans lines: %q", line)
				}
			}
			return
		}
		resolved, err := cfg.YAML()
		if err != nil {
			t.Fatalf("valid config does not print: %v", err)
		}
		again, err := opts.Parse(resolved, "resolved.yaml")
		if err != nil {
			t.Fatalf("the resolved config does not parse back: %v\n%s", err, resolved)
		}
		twice, err := again.YAML()
		if err != nil || !bytes.Equal(resolved, twice) {
			t.Fatalf("resolving twice changes the config (%v):\n%s\n---\n%s", err, resolved, twice)
		}
	})
}
