package restore

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/vmhistory/vmhistory/runner"
	"github.com/vmhistory/vmhistory/zfs"
)

// Seeds are read from the local source, else from a replica whose pool is
// on this host; a replica reached over ssh is never a seed.
func TestSeedSourceIsLocalOnly(t *testing.T) {
	known := filepath.Join(t.TempDir(), "known_hosts")
	if err := os.WriteFile(known, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	ssh, err := runner.NewSSH(runner.SSHConfig{Host: "127.0.0.1", KnownHostsFile: known})
	if err != nil {
		t.Fatal(err)
	}
	local := NewZFSSource(SourceLocal, KindLocal, zfs.New(&runner.Local{}, zfs.Options{}), nil)
	poolReplica := NewZFSSource(SourceReplica, KindReplica, zfs.New(&runner.Local{}, zfs.Options{}), nil)
	sshReplica := NewZFSSource(SourceReplica, KindReplica, zfs.New(ssh, zfs.Options{}), nil)
	entry := func(srcs ...Source) *Entry {
		e := &Entry{}
		for _, s := range srcs {
			e.Sources = append(e.Sources, EntrySource{Source: s})
		}
		return e
	}
	for _, c := range []struct {
		name  string
		entry *Entry
		want  Source
	}{
		{"local and replicas", entry(sshReplica, poolReplica, local), local},
		{"replica on a pool of this host", entry(sshReplica, poolReplica), poolReplica},
		{"replica over ssh", entry(sshReplica), nil},
		{"none", entry(), nil},
	} {
		got := seedSource(c.entry)
		if (got == nil) != (c.want == nil) || (got != nil && got.Source != c.want) {
			t.Errorf("%s: seed source %+v, want %v", c.name, got, c.want)
		}
	}
}
