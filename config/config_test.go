package config

import (
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
)

// writeFile creates a file with the given mode (umask does not apply) and
// returns its path.
func writeFile(t *testing.T, dir, name, content string, mode os.FileMode) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
	return path
}

// problems asserts that err is an *Errors and returns it.
func problems(t *testing.T, err error) *Errors {
	t.Helper()
	if err == nil {
		t.Fatal("Parse succeeded, want problems")
	}
	var errs *Errors
	if !errors.As(err, &errs) {
		t.Fatalf("error is %T (%v), want *config.Errors", err, err)
	}
	return errs
}

// findProblem returns the problem reported for key.
func findProblem(t *testing.T, errs *Errors, key string) FieldError {
	t.Helper()
	for _, p := range errs.Problems {
		if p.Key == key {
			return p
		}
	}
	t.Fatalf("no problem for key %q; got:\n%v", key, errs)
	return FieldError{}
}

func skipFiles() Options { return Options{SkipFileChecks: true} }

func TestMinimalFileGetsDefaults(t *testing.T) {
	cfg, err := skipFiles().Parse([]byte("datasets: [DATA/libvirt]\n"), "min.yaml")
	if err != nil {
		t.Fatal(err)
	}
	want := Default()
	want.Datasets = []Dataset{{Name: "DATA/libvirt", VMs: &VMSelection{All: true}}}
	want.KeepReplica = DefaultKeepLocal
	if !reflect.DeepEqual(cfg, want) {
		t.Errorf("got  %+v\nwant %+v", cfg, want)
	}
	// Spot-check the documented defaults, so that a changed constant is a
	// deliberate change.
	if cfg.SnapshotFormat != "2006-01-02_15:04:05" || cfg.KeepLocal != 20 || cfg.Quiesce.Mode != QuiesceManagedSave ||
		cfg.Quiesce.SaveTimeout != 5*time.Minute || cfg.Libvirt.URI != "qemu:///system" ||
		cfg.Libvirt.Socket != "/var/run/libvirt/libvirt-sock" || cfg.ZFS.Binary != "zfs" ||
		cfg.Mount.Path != "/mnt/vmhistory" || cfg.StateDir != "/var/lib/vmhistory" || cfg.Replica != nil || cfg.Kopia != nil {
		t.Errorf("unexpected defaults: %+v", cfg)
	}
	if got := cfg.SnapshotName(time.Date(2023, 3, 4, 5, 0, 1, 0, time.Local)); got != "2023-03-04_05:00:01" {
		t.Errorf("SnapshotName = %q", got)
	}
}

func TestSectionDefaults(t *testing.T) {
	cfg, err := skipFiles().Parse([]byte(`
datasets: [DATA/libvirt]
replica:
  target: ssh://backup.example.org/BACKUP/libvirt
  known_hosts: /etc/vmhistory/known_hosts
kopia:
  password_file: /etc/vmhistory/kopia.password
`), "sections.yaml")
	if err != nil {
		t.Fatal(err)
	}
	wantReplica := &Replica{
		Target:         ReplicaTarget{User: "root", Host: "backup.example.org", Port: 22, Dataset: "BACKUP/libvirt"},
		KnownHosts:     "/etc/vmhistory/known_hosts",
		ConnectTimeout: 15 * time.Second,
		CommandTimeout: 5 * time.Minute,
	}
	if !reflect.DeepEqual(cfg.Replica, wantReplica) {
		t.Errorf("replica = %+v, want %+v", cfg.Replica, wantReplica)
	}
	host, _ := os.Hostname()
	wantKopia := &Kopia{
		ConfigFile:   "/etc/vmhistory/kopia.config",
		PasswordFile: "/etc/vmhistory/kopia.password",
		Host:         strings.ToLower(strings.Split(host, ".")[0]),
		User:         "root",
		Incremental:  IncrementalStream,
		VerifyEvery:  DefaultVerifyEvery,
	}
	if !reflect.DeepEqual(cfg.Kopia, wantKopia) {
		t.Errorf("kopia = %+v, want %+v", cfg.Kopia, wantKopia)
	}
	if got := cfg.Datasets[0].ReplicaDataset; got != "BACKUP/libvirt" {
		t.Errorf("single dataset replica_dataset = %q, want the target itself", got)
	}
}

func TestDatasetShapesAndInheritance(t *testing.T) {
	cfg, err := skipFiles().Parse([]byte(`
datasets:
  - DATA/libvirt
  - name: FAST/vm-fast
    vms: [web, db]
  - name: DATA/other
    replica_dataset: BACKUP/elsewhere
  - name: DATA/novms
    vms: []
vms: [mail, dns]
keep_local: 10
keep_replica: 30
replica:
  target: BACKUP/replica
`), "shapes.yaml")
	if err != nil {
		t.Fatal(err)
	}
	want := []Dataset{
		{Name: "DATA/libvirt", VMs: &VMSelection{Names: []string{"mail", "dns"}}, ReplicaDataset: "BACKUP/replica/libvirt"},
		{Name: "FAST/vm-fast", VMs: &VMSelection{Names: []string{"web", "db"}}, ReplicaDataset: "BACKUP/replica/vm-fast"},
		{Name: "DATA/other", VMs: &VMSelection{Names: []string{"mail", "dns"}}, ReplicaDataset: "BACKUP/elsewhere"},
		{Name: "DATA/novms", VMs: &VMSelection{Names: []string{}}, ReplicaDataset: "BACKUP/replica/novms"},
	}
	if !reflect.DeepEqual(cfg.Datasets, want) {
		t.Errorf("datasets =\n%+v\nwant\n%+v", cfg.Datasets, want)
	}
	if cfg.KeepReplica != 30 || !cfg.Replica.Target.Local {
		t.Errorf("keep_replica %d, target %+v", cfg.KeepReplica, cfg.Replica.Target)
	}
	if !cfg.Datasets[1].VMs.Includes("web") || cfg.Datasets[1].VMs.Includes("mail") {
		t.Error("Includes is wrong")
	}
	// The inherited selection is a copy: changing one dataset's list must
	// not change the other's.
	cfg.Datasets[0].VMs.Names[0] = "changed"
	if cfg.VMs.Names[0] != "mail" || cfg.Datasets[2].VMs.Names[0] != "mail" {
		t.Error("inherited VM lists share memory")
	}
}

func TestScalarDatasetsAccepted(t *testing.T) {
	cfg, err := skipFiles().Parse([]byte("datasets: DATA/libvirt\n"), "scalar.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.Datasets) != 1 || cfg.Datasets[0].Name != "DATA/libvirt" {
		t.Errorf("datasets = %+v", cfg.Datasets)
	}
}

func TestBadFiles(t *testing.T) {
	tests := []struct {
		name  string
		yaml  string
		key   string
		value string // "" means: do not check
		line  int    // 0 means: do not check
		msg   string // substring of the message
	}{
		{"unknown key with suggestion", "datasets: [DATA/libvirt]\nkepp_local: 3\n", "kepp_local", "", 2, `unknown key "kepp_local"; did you mean "keep_local"?`},
		{"unknown key dash spelling", "datasets: [DATA/libvirt]\nkeep-local: 3\n", "keep-local", "", 2, `did you mean "keep_local"?`},
		{"unknown nested key", "datasets: [DATA/libvirt]\nkopia:\n  pasword_file: /x\n", "kopia.pasword_file", "", 3, `did you mean "password_file"?`},
		{"key in wrong section", "datasets: [DATA/libvirt]\npassword_file: /x\n", "password_file", "", 2, `did you mean "kopia.password_file"?`},
		{"unknown key lists known keys", "datasets: [DATA/libvirt]\nquiesce:\n  xyzzy: 1\n", "quiesce.xyzzy", "", 3, "the keys under quiesce are: agent_wait, mode, parallel, resume_timeout, save_timeout"},
		{"unknown key in dataset", "datasets:\n  - name: DATA/libvirt\n    vm: [a]\n", "datasets[0].vm", "", 3, `did you mean "vms"?`},
		{"duplicate key", "datasets: [DATA/libvirt]\nkeep_local: 3\nkeep_local: 4\n", "keep_local", "", 3, "is given twice (first on line 2)"},
		{"wrong type string into int", "datasets: [DATA/libvirt]\nkeep_local: abc\n", "keep_local", "abc", 2, "must be a whole number, not text"},
		{"wrong type float into int", "datasets: [DATA/libvirt]\nkeep_local: 2.5\n", "keep_local", "2.5", 2, "must be a whole number"},
		{"wrong type list into string", "datasets: [DATA/libvirt]\nlibvirt:\n  uri: [a, b]\n", "libvirt.uri", "", 3, "must be text, not a list"},
		{"wrong type scalar into section", "datasets: [DATA/libvirt]\nquiesce: managedsave\n", "quiesce", "managedsave", 2, "must be a mapping"},
		{"wrong type mapping into list", "datasets:\n  name: DATA/libvirt\n", "datasets", "", 1, "must be a list, not a mapping"},
		{"no datasets", "keep_local: 3\n", "datasets", "", 0, "is required"},
		{"empty dataset list", "datasets: []\n", "datasets", "", 1, "is required"},
		{"duplicate datasets", "datasets:\n  - DATA/libvirt\n  - name: DATA/libvirt\n", "datasets[1].name", "DATA/libvirt", 3, "is listed twice (also datasets[0])"},
		{"dataset with snapshot", "datasets: [DATA/libvirt@2023-03-04_05:00:01]\n", "datasets[0]", "DATA/libvirt@2023-03-04_05:00:01", 1, `contains '@'`},
		{"dataset with bookmark", "datasets: ['DATA/libvirt#b']\n", "datasets[0]", "DATA/libvirt#b", 1, "bookmark"},
		{"dataset empty component", "datasets: [DATA//libvirt]\n", "datasets[0]", "DATA//libvirt", 1, "empty component"},
		{"dataset trailing slash", "datasets: [DATA/libvirt/]\n", "datasets[0]", "DATA/libvirt/", 1, "empty component"},
		{"dataset as mountpoint", "datasets: [/var/lib/libvirt]\n", "datasets[0]", "/var/lib/libvirt", 1, "not a mountpoint"},
		{"dataset bad character", "datasets: ['DATA/lib virt']\n", "datasets[0]", "DATA/lib virt", 1, "contains ' '"},
		{"pool starts with digit", "datasets: [1DATA/libvirt]\n", "datasets[0]", "1DATA/libvirt", 1, "does not start with a letter"},
		{"reserved pool", "datasets: [mirror1/libvirt]\n", "datasets[0]", "mirror1/libvirt", 1, "reserves"},
		{"dataset mapping without name", "datasets:\n  - vms: [a]\n", "datasets[0].name", "", 2, "is required"},
		{"bad snapshot_format space", "datasets: [DATA/libvirt]\nsnapshot_format: 2006-01-02 15:04:05\n", "snapshot_format", "2006-01-02 15:04:05", 2, "contains ' '"},
		{"bad snapshot_format no seconds", "datasets: [DATA/libvirt]\nsnapshot_format: 2006-01-02_15:04\n", "snapshot_format", "2006-01-02_15:04", 2, "lacks the seconds"},
		{"bad snapshot_format no date", "datasets: [DATA/libvirt]\nsnapshot_format: '15:04:05'\n", "snapshot_format", "15:04:05", 2, "lacks the year"},
		{"bad snapshot_format 12h clock", "datasets: [DATA/libvirt]\nsnapshot_format: 2006-01-02_03:04:05\n", "snapshot_format", "2006-01-02_03:04:05", 2, "12-hour clock"},
		{"bad snapshot_format zone", "datasets: [DATA/libvirt]\nsnapshot_format: 2006-01-02T15:04:05Z07:00\n", "snapshot_format", "2006-01-02T15:04:05Z07:00", 2, "contains '+'"},
		{"bad snapshot_format slash", "datasets: [DATA/libvirt]\nsnapshot_format: 2006/01/02_15:04:05\n", "snapshot_format", "2006/01/02_15:04:05", 2, "contains '/'"},
		{"keep_local negative", "datasets: [DATA/libvirt]\nkeep_local: -3\n", "keep_local", "-3", 2, "must be at least 1"},
		{"keep_local zero", "datasets: [DATA/libvirt]\nkeep_local: 0\n", "keep_local", "0", 2, "must be at least 1"},
		{"keep_replica below keep_local", "datasets: [DATA/libvirt]\nkeep_local: 20\nkeep_replica: 5\n", "keep_replica", "5", 3, "is less than keep_local (20)"},
		{"keep_replica negative", "datasets: [DATA/libvirt]\nkeep_replica: -1\n", "keep_replica", "-1", 2, "must be 0"},
		{"vms scalar", "datasets: [DATA/libvirt]\nvms: web\n", "vms", "web", 2, `must be "all" or a list`},
		{"vms duplicate", "datasets: [DATA/libvirt]\nvms: [web, web]\n", "vms[1]", "web", 2, "is listed twice"},
		{"vms all inside list", "datasets: [DATA/libvirt]\nvms: [all]\n", "vms[0]", "all", 2, "write vms: all (without brackets)"},
		{"vms with slash", "datasets:\n  - name: DATA/libvirt\n    vms: [a/b]\n", "datasets[0].vms[0]", "a/b", 3, "contains /"},
		{"bad quiesce mode", "datasets: [DATA/libvirt]\nquiesce:\n  mode: hibernate\n", "quiesce.mode", "hibernate", 3, "must be one of managedsave, save, suspend, fsfreeze, none"},
		{"quiesce mode case", "datasets: [DATA/libvirt]\nquiesce:\n  mode: ManagedSave\n", "quiesce.mode", "ManagedSave", 3, `did you mean "managedsave"?`},
		{"duration without unit", "datasets: [DATA/libvirt]\nquiesce:\n  save_timeout: 300\n", "quiesce.save_timeout", "300", 3, "has no unit"},
		{"duration in days", "datasets: [DATA/libvirt]\nzfs:\n  send_timeout: 2d\n", "zfs.send_timeout", "2d", 3, "write 24h"},
		{"duration negative", "datasets: [DATA/libvirt]\nquiesce:\n  resume_timeout: -5m\n", "quiesce.resume_timeout", "-5m", 3, "must be more than zero"},
		{"duration zero", "datasets: [DATA/libvirt]\nzfs:\n  command_timeout: 0s\n", "zfs.command_timeout", "0s", 3, "must be more than zero"},
		{"libvirt uri without scheme", "datasets: [DATA/libvirt]\nlibvirt:\n  uri: system\n", "libvirt.uri", "system", 3, "libvirt connection URI"},
		{"relative socket", "datasets: [DATA/libvirt]\nlibvirt:\n  socket: libvirt-sock\n", "libvirt.socket", "libvirt-sock", 3, "absolute path"},
		{"ssh bad port", "datasets: [DATA/libvirt]\nreplica:\n  target: ssh://root@backup:70000/BACKUP/libvirt\n  known_hosts: /k\n", "replica.target", "ssh://root@backup:70000/BACKUP/libvirt", 3, `invalid port "70000"`},
		{"ssh port not a number", "datasets: [DATA/libvirt]\nreplica:\n  target: ssh://root@backup:ssh/BACKUP/libvirt\n  known_hosts: /k\n", "replica.target", "ssh://root@backup:ssh/BACKUP/libvirt", 3, "invalid port"},
		{"ssh missing dataset", "datasets: [DATA/libvirt]\nreplica:\n  target: ssh://root@backup\n  known_hosts: /k\n", "replica.target", "ssh://root@backup", 3, "names no dataset"},
		{"ssh missing dataset slash", "datasets: [DATA/libvirt]\nreplica:\n  target: ssh://root@backup:2222/\n  known_hosts: /k\n", "replica.target", "", 3, "names no dataset; write ssh://root@backup:2222/POOL/dataset"},
		{"ssh bad dataset", "datasets: [DATA/libvirt]\nreplica:\n  target: ssh://root@backup/BACKUP//x\n  known_hosts: /k\n", "replica.target", "", 3, "empty component"},
		{"ssh password", "datasets: [DATA/libvirt]\nreplica:\n  target: ssh://root:secret@backup/BACKUP/x\n  known_hosts: /k\n", "replica.target", "", 3, "password"},
		{"wrong scheme", "datasets: [DATA/libvirt]\nreplica:\n  target: sftp://root@backup/BACKUP/x\n", "replica.target", "", 3, `scheme "sftp"`},
		{"scp style target", "datasets: [DATA/libvirt]\nreplica:\n  target: root@backup:BACKUP/x\n", "replica.target", "root@backup:BACKUP/x", 3, "write ssh://user@host/POOL/dataset"},
		{"ssh bad host", "datasets: [DATA/libvirt]\nreplica:\n  target: ssh://root@-oProxyCommand=x/BACKUP/x\n  known_hosts: /k\n", "replica.target", "", 3, "invalid host name"},
		{"replica without target", "datasets: [DATA/libvirt]\nreplica:\n  connect_timeout: 5s\n", "replica.target", "", 2, "is required"},
		{"ssh without known_hosts", "datasets: [DATA/libvirt]\nreplica:\n  target: ssh://root@backup/BACKUP/libvirt\n", "replica.known_hosts", "", 2, "is required for an ssh target"},
		{"local target with ssh settings", "datasets: [DATA/libvirt]\nreplica:\n  target: backup.example.org/BACKUP/libvirt\n  known_hosts: /k\n", "replica.known_hosts", "/k", 4, "is a dataset on this host"},
		{"replica pool root", "datasets: [DATA/libvirt]\nreplica:\n  target: BACKUP\n", "replica.target", "BACKUP", 3, "pool's root dataset"},
		{"replica inside source", "datasets: [DATA/libvirt]\nreplica:\n  target: DATA/libvirt/backup\n", "replica.target", "DATA/libvirt/backup", 3, "on or around the source dataset"},
		{"replica_dataset without replica", "datasets:\n  - name: DATA/libvirt\n    replica_dataset: BACKUP/x\n", "datasets[0].replica_dataset", "BACKUP/x", 3, "there is no replica section"},
		{"replica datasets collide", "datasets: [DATA/a/vm, DATA/b/vm]\nreplica:\n  target: BACKUP/r\n", "datasets[1].replica_dataset", "BACKUP/r/vm", 1, "is also the replica of DATA/a/vm"},
		{"explicit replica dataset collides", "datasets:\n  - DATA/a\n  - name: DATA/b\n    replica_dataset: BACKUP/r/a\nreplica:\n  target: BACKUP/r\n", "datasets[1].replica_dataset", "BACKUP/r/a", 4, "is also the replica of DATA/a"},
		{"kopia without password_file", "datasets: [DATA/libvirt]\nkopia:\n  compression: zstd\n", "kopia.password_file", "", 2, "is required"},
		{"kopia relative password_file", "datasets: [DATA/libvirt]\nkopia:\n  password_file: kopia.password\n", "kopia.password_file", "kopia.password", 3, "absolute path"},
		{"unknown compression", "datasets: [DATA/libvirt]\nkopia:\n  password_file: /p\n  compression: zstd-better\n", "kopia.compression", "zstd-better", 4, `did you mean "zstd-better-compression"?`},
		{"unknown compression lists choices", "datasets: [DATA/libvirt]\nkopia:\n  password_file: /p\n  compression: brotli\n", "kopia.compression", "brotli", 4, "s2-parallel-4"},
		{"deprecated compression", "datasets: [DATA/libvirt]\nkopia:\n  password_file: /p\n  compression: lz4\n", "kopia.compression", "lz4", 4, "deprecated"},
		{"unknown splitter", "datasets: [DATA/libvirt]\nkopia:\n  password_file: /p\n  splitter: FIXED-64K\n", "kopia.splitter", "FIXED-64K", 4, "is not a kopia splitter"},
		{"splitter case", "datasets: [DATA/libvirt]\nkopia:\n  password_file: /p\n  splitter: fixed-128k\n", "kopia.splitter", "fixed-128k", 4, `did you mean "FIXED-128K"?`},
		{"unknown incremental", "datasets: [DATA/libvirt]\nkopia:\n  password_file: /p\n  incremental: zfs\n", "kopia.incremental", "zfs", 4, `is neither "stream"`},
		{"negative verify_every", "datasets: [DATA/libvirt]\nkopia:\n  password_file: /p\n  verify_every: -1\n", "kopia.verify_every", "-1", 4, "must be 0 (never)"},
		{"kopia host with colon", "datasets: [DATA/libvirt]\nkopia:\n  password_file: /p\n  host: 'a:b'\n", "kopia.host", "a:b", 4, "must not contain"},
		{"zfs relative binary", "datasets: [DATA/libvirt]\nzfs:\n  binary: ./zfs\n", "zfs.binary", "./zfs", 3, "absolute path"},
		{"metrics not prom", "datasets: [DATA/libvirt]\nmetrics:\n  textfile: /var/lib/node/vmhistory.txt\n", "metrics.textfile", "/var/lib/node/vmhistory.txt", 3, "must end in .prom"},
		{"mount root", "datasets: [DATA/libvirt]\nmount:\n  path: /\n", "mount.path", "/", 3, "must not be /"},
		{"relative state_dir", "datasets: [DATA/libvirt]\nstate_dir: var/lib/vmhistory\n", "state_dir", "var/lib/vmhistory", 2, "absolute path"},
		{"merge key", "datasets: [DATA/libvirt]\nbase: &b {mode: none}\nquiesce:\n  <<: *b\n", "quiesce.<<", "", 4, "merge keys"},
		{"top level list", "- DATA/libvirt\n", "", "", 1, "must be a mapping of keys"},
		{"syntax error", "datasets: [DATA/libvirt\nkeep_local: 3\n", "", "", 0, "invalid YAML"},
		{"tab indentation", "quiesce:\n\tmode: none\n", "", "", 2, "indented with tabs"},
		{"two documents", "datasets: [DATA/libvirt]\n---\nkeep_local: 3\n", "", "", 2, "second YAML document"},
		{"empty file", "", "", "", 0, "the file is empty"},
		{"comments only", "# nothing yet\n", "", "", 0, "the file is empty"},
		{"null document", "---\n~\n", "", "", 0, "holds no settings"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := skipFiles().Parse([]byte(tt.yaml), "bad.yaml")
			errs := problems(t, err)
			p := findProblem(t, errs, tt.key)
			if tt.value != "" && p.Value != tt.value {
				t.Errorf("value = %q, want %q", p.Value, tt.value)
			}
			if tt.line != 0 && p.Line != tt.line {
				t.Errorf("line = %d, want %d (%s)", p.Line, tt.line, p)
			}
			if !strings.Contains(p.Message, tt.msg) {
				t.Errorf("message %q does not contain %q", p.Message, tt.msg)
			}
			// The printed form names the file, the key and the value.
			text := err.Error()
			t.Log(text)
			if !strings.HasPrefix(text, "bad.yaml") || !strings.Contains(text, tt.key) || (p.Value != "" && !strings.Contains(text, `"`+p.Value+`"`)) {
				t.Errorf("Error() = %q does not name file, key %q and value %q", text, tt.key, p.Value)
			}
		})
	}
}

func TestErrorFormat(t *testing.T) {
	_, err := skipFiles().Parse([]byte("datasets: [DATA/libvirt]\n\n\nkeep_local: -3\n"), "config.yaml")
	want := `config.yaml:4: keep_local: "-3" must be at least 1: the newest snapshot is the base of the next incremental send`
	if err == nil || err.Error() != want {
		t.Errorf("Error() =\n%v\nwant\n%s", err, want)
	}
}

func TestAllProblemsCollectedInLineOrder(t *testing.T) {
	_, err := skipFiles().Parse([]byte(`
datasets:
  - DATA/libvirt
  - DATA/libvirt
kepp_local: 3
quiesce:
  mode: pause
  save_timeout: soon
replica:
  target: ssh://root@backup:0/BACKUP/libvirt
kopia:
  password_file: /etc/vmhistory/kopia.password
  compression: zip
keep_local: -1
`), "many.yaml")
	errs := problems(t, err)
	wantKeys := []string{"datasets[1]", "kepp_local", "quiesce.mode", "quiesce.save_timeout", "replica.target", "kopia.compression", "keep_local"}
	var got []string
	for _, p := range errs.Problems {
		got = append(got, p.Key)
	}
	if !reflect.DeepEqual(got, wantKeys) {
		t.Errorf("problems for keys %q, want %q:\n%v", got, wantKeys, err)
	}
	if lines := strings.Split(err.Error(), "\n"); len(lines) != len(wantKeys) {
		t.Errorf("Error() has %d lines, want one per problem:\n%v", len(lines), err)
	}
}

func TestPasswordFilePermissions(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, dir, "kopia.config", "{}", 0o600)
	tests := []struct {
		mode os.FileMode
		msg  string // "" means accepted
	}{
		{0o600, ""},
		{0o400, ""},
		{0o644, "is readable by group or other (mode 0644); run: chmod 600 "},
		{0o640, "is readable by group or other (mode 0640)"},
		{0o604, "is readable by group or other (mode 0604)"},
		{0o620, "is writable by group or other (mode 0620)"},
		{0o666, "is readable and writable by group or other (mode 0666)"},
	}
	for _, tt := range tests {
		t.Run(tt.mode.String(), func(t *testing.T) {
			pw := writeFile(t, dir, "kopia.password", "secret\n", tt.mode)
			file := "datasets: [DATA/libvirt]\nzfs:\n  binary: /bin/sh\nkopia:\n  config_file: " + filepath.Join(dir, "kopia.config") + "\n  password_file: " + pw + "\n"
			cfg, err := Parse([]byte(file), "pw.yaml")
			if tt.msg == "" {
				if err != nil {
					t.Fatalf("mode %04o refused: %v", tt.mode, err)
				}
				if cfg.Kopia.PasswordFile != pw {
					t.Errorf("password_file = %q", cfg.Kopia.PasswordFile)
				}
				return
			}
			p := findProblem(t, problems(t, err), "kopia.password_file")
			if p.Value != pw || p.Line != 6 || !strings.Contains(p.Message, tt.msg) {
				t.Errorf("got %s, want value %q line 6 and %q", p, pw, tt.msg)
			}
			if tt.mode == 0o644 && !strings.HasSuffix(p.Message, "chmod 600 "+pw) {
				t.Errorf("message %q does not end with the chmod command", p.Message)
			}
			// Skipping file checks accepts it: the file may be meant for another host.
			if _, err := skipFiles().Parse([]byte(file), "pw.yaml"); err != nil {
				t.Errorf("with SkipFileChecks: %v", err)
			}
		})
	}
}

func TestFileChecks(t *testing.T) {
	t.Setenv(kopiaPasswordEnv, "") // it would stand in for the missing password file
	dir := t.TempDir()
	known := writeFile(t, dir, "known_hosts", "backup ssh-ed25519 AAAA\n", 0o644)
	goodKey := writeFile(t, dir, "id_ok", "key\n", 0o600)
	openKey := writeFile(t, dir, "id_open", "key\n", 0o644)
	pw := writeFile(t, dir, "pw", "secret", 0o600)
	emptyPw := writeFile(t, dir, "pw-empty", "", 0o600)
	kopiaCfg := writeFile(t, dir, "kopia.config", "{}", 0o600)
	missing := filepath.Join(dir, "missing")
	if err := os.Mkdir(filepath.Join(dir, "textfiles"), 0o755); err != nil {
		t.Fatal(err)
	}
	head := "datasets: [DATA/libvirt]\nzfs:\n  binary: /bin/sh\n"
	replica := func(knownHosts, identity string) string {
		s := head + "replica:\n  target: ssh://root@backup/BACKUP/libvirt\n  known_hosts: " + knownHosts + "\n"
		if identity != "" {
			s += "  identity_file: " + identity + "\n"
		}
		return s
	}
	kopia := func(configFile, password string) string {
		return head + "kopia:\n  config_file: " + configFile + "\n  password_file: " + password + "\n"
	}
	tests := []struct {
		name, yaml, key, msg string
	}{
		{"all good", replica(known, goodKey) + strings.TrimPrefix(kopia(kopiaCfg, pw), head) + "metrics:\n  textfile: " + dir + "/textfiles/vmhistory.prom\n", "", ""},
		{"known_hosts missing", replica(missing, ""), "replica.known_hosts", "does not exist"},
		{"known_hosts is a directory", replica(dir, ""), "replica.known_hosts", "is not a regular file"},
		{"known_hosts empty", replica(emptyPw, ""), "replica.known_hosts", "is empty; add backup's host key"},
		{"identity missing", replica(known, missing), "replica.identity_file", "does not exist"},
		{"identity readable by others", replica(known, openKey), "replica.identity_file", "is readable by group or other (mode 0644); run: chmod 600"},
		{"password missing", kopia(kopiaCfg, missing), "kopia.password_file", "does not exist; create it with a new password: (umask 077; head -c 30 /dev/urandom | base64 > " + missing + "), or set $KOPIA_PASSWORD"},
		{"password empty", kopia(kopiaCfg, emptyPw), "kopia.password_file", "is empty"},
		{"password is a directory", kopia(kopiaCfg, dir), "kopia.password_file", "is not a regular file"},
		{"metrics directory missing", head + "metrics:\n  textfile: " + missing + "/vmhistory.prom\n", "metrics.textfile", "does not exist"},
		{"zfs binary missing", "datasets: [DATA/libvirt]\nzfs:\n  binary: " + missing + "\n", "zfs.binary", "is not an executable program"},
		{"zfs binary not in PATH", "datasets: [DATA/libvirt]\nzfs:\n  binary: no-such-zfs-binary\n", "zfs.binary", "is not an executable program"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Parse([]byte(tt.yaml), "files.yaml")
			if tt.key == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			p := findProblem(t, problems(t, err), tt.key)
			if !strings.Contains(p.Message, tt.msg) {
				t.Errorf("message %q does not contain %q", p.Message, tt.msg)
			}
			if _, err := skipFiles().Parse([]byte(tt.yaml), "files.yaml"); err != nil {
				t.Errorf("with SkipFileChecks: %v", err)
			}
		})
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "config.yaml")
	_, err := Load(missing)
	errs := problems(t, err)
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("errors.Is(err, fs.ErrNotExist) is false for %v", err)
	}
	if text := err.Error(); strings.Contains(text, "\n") || !strings.HasPrefix(text, missing+": ") || !strings.Contains(text, "--config") {
		t.Errorf("missing file: %q, want one line naming %s and --config", text, missing)
	}
	if len(errs.Problems) != 1 {
		t.Errorf("%d problems, want 1", len(errs.Problems))
	}

	path := writeFile(t, dir, "config.yaml", "datasets: [DATA/libvirt]\nzfs:\n  binary: /bin/sh\n", 0o644)
	cfg, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Datasets[0].Name != "DATA/libvirt" {
		t.Errorf("datasets = %+v", cfg.Datasets)
	}
	path = writeFile(t, dir, "bad.yaml", "datasets: [DATA/libvirt]\nkeep_local: 0\n", 0o644)
	if _, err := Load(path); err == nil || !strings.HasPrefix(err.Error(), path+":2: keep_local:") {
		t.Errorf("Load(bad) = %v, want it to name %s:2", err, path)
	}
}

// exampleWithLocalFiles rewrites the example's /etc/vmhistory paths into
// dir and creates the files it names, as the seed host has them.
func exampleWithLocalFiles(t *testing.T, dir string) []byte {
	t.Helper()
	text := strings.ReplaceAll(Example(), "/etc/vmhistory/", dir+"/")
	if !strings.Contains(Example(), "/etc/vmhistory/kopia.password") {
		t.Fatal("the example no longer names /etc/vmhistory/kopia.password; update this test")
	}
	writeFile(t, dir, "known_hosts", "backup.example.org ssh-ed25519 AAAA\n", 0o644)
	writeFile(t, dir, "id_ed25519", "key\n", 0o600)
	writeFile(t, dir, "kopia.config", "{}\n", 0o600)
	writeFile(t, dir, "kopia.password", "secret\n", 0o600)
	if _, err := exec.LookPath("zfs"); err != nil {
		// This machine has no zfs; any executable proves the check passes.
		text = strings.Replace(text, "  binary: zfs\n", "  binary: /bin/sh\n", 1)
	}
	return []byte(text)
}

func TestExampleIsValid(t *testing.T) {
	// Without the files it names, only file checks fail...
	_, err := Parse([]byte(Example()), "example.yaml")
	if err != nil {
		for _, p := range problems(t, err).Problems {
			switch p.Key {
			case "replica.known_hosts", "replica.identity_file", "kopia.config_file", "kopia.password_file", "zfs.binary":
			default:
				t.Errorf("example.yaml: %s", p)
			}
		}
	}
	cfg, err := skipFiles().Parse([]byte(Example()), "example.yaml")
	if err != nil {
		t.Fatalf("example.yaml with SkipFileChecks: %v", err)
	}
	// ...and with them in place it is valid as it stands.
	if _, err := Parse(exampleWithLocalFiles(t, t.TempDir()), "example.yaml"); err != nil {
		t.Fatalf("example.yaml with its files present: %v", err)
	}
	// It describes the seed host.
	if cfg.Datasets[0].Name != "DATA/libvirt" || cfg.KeepLocal != 20 || cfg.Quiesce.Mode != QuiesceManagedSave ||
		cfg.Replica.Target.String() != "ssh://root@backup.example.org:22/BACKUP/libvirt" ||
		cfg.Datasets[0].ReplicaDataset != "BACKUP/libvirt" || cfg.Kopia.Compression != "zstd-better-compression" {
		t.Errorf("example resolves to %+v", cfg)
	}
	// Every key of the format appears in the example, set or commented out.
	for _, path := range keyPaths("", reflect.TypeOf(Config{})) {
		last := path[strings.LastIndexAny(path, ".]")+1:]
		if !strings.Contains(Example(), last+":") {
			t.Errorf("example.yaml does not mention %s", path)
		}
	}
}

func TestResolvedOutputRoundTrips(t *testing.T) {
	for _, src := range []string{
		Example(),
		"datasets: [DATA/libvirt]\n",
		"datasets:\n  - DATA/a\n  - name: DATA/b\n    vms: []\nvms: [x, y]\nreplica:\n  target: ssh://u@[fe80::1]:2222/B/r\n  known_hosts: /k\nmetrics:\n  textfile: /m/v.prom\n",
	} {
		cfg, err := skipFiles().Parse([]byte(src), "src.yaml")
		if err != nil {
			t.Fatal(err)
		}
		out, err := cfg.YAML()
		if err != nil {
			t.Fatal(err)
		}
		again, err := skipFiles().Parse(out, "resolved.yaml")
		if err != nil {
			t.Fatalf("resolved output does not parse: %v\n%s", err, out)
		}
		if !reflect.DeepEqual(cfg, again) {
			t.Errorf("round trip changed the config:\n%s", out)
		}
		js, err := json.Marshal(cfg)
		if err != nil {
			t.Fatal(err)
		}
		var m map[string]any
		if err := json.Unmarshal(js, &m); err != nil {
			t.Fatalf("invalid JSON %s: %v", js, err)
		}
		if m["keep_local"] != float64(cfg.KeepLocal) || m["quiesce"].(map[string]any)["save_timeout"] != "5m" {
			t.Errorf("JSON %s", js)
		}
	}
}

func TestParseReplicaTarget(t *testing.T) {
	tests := []struct {
		in     string
		want   ReplicaTarget
		str    string
		errMsg string
	}{
		{in: "BACKUP/libvirt", want: ReplicaTarget{Local: true, Dataset: "BACKUP/libvirt"}, str: "BACKUP/libvirt"},
		{in: "ssh://root@backup.example.org/BACKUP/libvirt", want: ReplicaTarget{User: "root", Host: "backup.example.org", Port: 22, Dataset: "BACKUP/libvirt"}, str: "ssh://root@backup.example.org:22/BACKUP/libvirt"},
		{in: "ssh://backup:2222/BACKUP/libvirt", want: ReplicaTarget{User: "root", Host: "backup", Port: 2222, Dataset: "BACKUP/libvirt"}, str: "ssh://root@backup:2222/BACKUP/libvirt"},
		{in: "ssh://zfs@10.0.0.2/B/x", want: ReplicaTarget{User: "zfs", Host: "10.0.0.2", Port: 22, Dataset: "B/x"}, str: "ssh://zfs@10.0.0.2:22/B/x"},
		{in: "ssh://root@[::1]:2022/B/x", want: ReplicaTarget{User: "root", Host: "::1", Port: 2022, Dataset: "B/x"}, str: "ssh://root@[::1]:2022/B/x"},
		{in: "", errMsg: "is empty"},
		{in: "ssh://root@backup:0/B/x", errMsg: "invalid port"},
		{in: "ssh://root@backup:/B/x", errMsg: "empty port"},
		{in: "ssh://root@/B/x", errMsg: "has no host"},
		{in: "ssh://@backup/B/x", errMsg: "empty user name"},
		{in: "ssh://root@backup/B/x?compress=1", errMsg: "query"},
		{in: "ssh://root@backup/B/x@snap", errMsg: "contains '@'"},
		{in: "ssh://root@backup/1B/x", errMsg: "does not start with a letter"},
		{in: "file:///B/x", errMsg: `scheme "file"`},
		{in: "backup:B/x", errMsg: "ssh://user@host/POOL/dataset"},
		{in: "B/x/", errMsg: "empty component"},
	}
	for _, tt := range tests {
		got, err := ParseReplicaTarget(tt.in)
		if tt.errMsg != "" {
			if err == nil || !strings.Contains(err.Error(), tt.errMsg) {
				t.Errorf("ParseReplicaTarget(%q) = %+v, %v; want error containing %q", tt.in, got, err, tt.errMsg)
			}
			continue
		}
		if err != nil || got != tt.want || got.String() != tt.str {
			t.Errorf("ParseReplicaTarget(%q) = %+v (%q), %v; want %+v (%q)", tt.in, got, got.String(), err, tt.want, tt.str)
		}
		if again, err := ParseReplicaTarget(got.String()); err != nil || again != got {
			t.Errorf("String() %q does not parse back: %+v, %v", got.String(), again, err)
		}
	}
}

func TestSnapshotFormats(t *testing.T) {
	for _, good := range []string{
		DefaultSnapshotFormat,
		"2006-01-02T15.04.05",
		"vmhistory-20060102-150405",
		"2006-01-02_15:04:05.000",
		"Jan-02-2006_15:04:05",
		"2006-01-02_3:04:05PM",
	} {
		if err := checkSnapshotFormat(good); err != nil {
			t.Errorf("checkSnapshotFormat(%q) = %v, want ok", good, err)
		}
	}
	for _, bad := range []string{"", "2006-01-02", "2006-01-02_15:04", "01-02_15:04:05", "2006-01-02_03:04:05", "2006-01-02_15:04:05 MST", "2006-01-02_15:04:05-0700", "2006-02_15:04:05", "nightly"} {
		if err := checkSnapshotFormat(bad); err == nil {
			t.Errorf("checkSnapshotFormat(%q) accepted", bad)
		}
	}
}

func TestParseSnapshotName(t *testing.T) {
	cfg := Default()
	when, ok := cfg.ParseSnapshotName("2023-03-04_05:00:01")
	if !ok || !when.Equal(time.Date(2023, 3, 4, 5, 0, 1, 0, time.Local)) {
		t.Errorf("ParseSnapshotName = %v, %v", when, ok)
	}
	for _, foreign := range []string{"manual-before-upgrade", "2023-03-04_05:00:01x", "2023-3-04_05:00:01", "zfs-auto-snap_daily-2023-03-04-0500"} {
		if _, ok := cfg.ParseSnapshotName(foreign); ok {
			t.Errorf("ParseSnapshotName(%q) claims a snapshot vmhistory did not make", foreign)
		}
	}
}

func TestDatasetNames(t *testing.T) {
	for _, good := range []string{"DATA", "DATA/libvirt", "a/b/c-d_e.f:g", "tank/vm.disks"} {
		if err := checkDatasetName(good); err != nil {
			t.Errorf("checkDatasetName(%q) = %v", good, err)
		}
	}
	for _, bad := range []string{"", "/DATA", "DATA/", "DATA//x", "DATA/x@y", "DATA#b", "DATA/a b", "9pool/x", "_pool", "raidz/x", "log", "DATA/..", strings.Repeat("a", 256), "DATA/é"} {
		if err := checkDatasetName(bad); err == nil {
			t.Errorf("checkDatasetName(%q) accepted", bad)
		}
	}
}

func TestClosest(t *testing.T) {
	keys := []string{"keep_local", "keep_replica", "snapshot_format", "datasets", "vms"}
	for in, want := range map[string]string{
		"kepp_local":     "keep_local",
		"keeplocal":      "keep_local",
		"KeepReplica":    "keep_replica",
		"snapshot-fmt":   "",
		"snapshotformat": "snapshot_format",
		"dataset":        "datasets",
		"vm":             "vms",
		"xyz":            "",
	} {
		if got := closest(in, keys); got != want {
			t.Errorf("closest(%q) = %q, want %q", in, got, want)
		}
	}
}

// Commands other than "config check" leave the kopia files to the code that
// opens the repository, so that a kopia problem fails only what needs it.
func TestSkipKopiaFileChecks(t *testing.T) {
	t.Setenv(kopiaPasswordEnv, "")
	os.Unsetenv(kopiaPasswordEnv)
	dir := t.TempDir()
	open := writeFile(t, dir, "kopia.password", "secret\n", 0o644)
	missing := filepath.Join(dir, "missing")
	for _, file := range []string{
		"datasets: [DATA/libvirt]\nzfs:\n  binary: /bin/sh\nkopia:\n  config_file: " + missing + "\n  password_file: " + open + "\n",
		"datasets: [DATA/libvirt]\nzfs:\n  binary: /bin/sh\nkopia:\n  config_file: " + missing + "\n  password_file: " + missing + "\n",
	} {
		if _, err := (Options{SkipKopiaFileChecks: true}).Parse([]byte(file), "k.yaml"); err != nil {
			t.Errorf("with SkipKopiaFileChecks: %v", err)
		}
		if _, err := Parse([]byte(file), "k.yaml"); err == nil || !problems(t, err).Has("kopia.password_file") {
			t.Errorf("with every check: %v, want kopia.password_file refused", err)
		}
	}
}

// $KOPIA_PASSWORD stands in for a missing password file (a warning), but a
// file others can read is refused even then.
func TestKopiaPasswordEnvStandsInForMissingFile(t *testing.T) {
	t.Setenv(kopiaPasswordEnv, "from-env")
	dir := t.TempDir()
	kopiaCfg := writeFile(t, dir, "kopia.config", "{}", 0o600)
	open := writeFile(t, dir, "kopia.password", "secret\n", 0o644)
	missing := filepath.Join(dir, "missing")
	file := func(pw string) []byte {
		return []byte("datasets: [DATA/libvirt]\nzfs:\n  binary: /bin/sh\nkopia:\n  config_file: " + kopiaCfg + "\n  password_file: " + pw + "\n")
	}
	_, notes, err := Options{}.ParseNotes(file(missing), "env.yaml")
	if err != nil {
		t.Fatalf("missing password file with $KOPIA_PASSWORD set: %v", err)
	}
	if lines := notes.Warnings.Lines(); len(lines) != 1 || lines[0] != `env.yaml:6: kopia.password_file: "`+missing+`" does not exist; $KOPIA_PASSWORD is set and is used instead` {
		t.Errorf("warnings %q", lines)
	}
	if _, err := Parse(file(open), "env.yaml"); err == nil || !problems(t, err).Has("kopia.password_file") {
		t.Errorf("open password file with $KOPIA_PASSWORD set: %v, want it refused", err)
	}
}

// On a fresh install the kopia repository is created after the
// configuration is checked: its missing config is a warning that says how
// to create it, and the rest is still checked.
func TestKopiaConfigMissingIsAWarning(t *testing.T) {
	t.Setenv(kopiaPasswordEnv, "")
	dir := t.TempDir()
	pw := writeFile(t, dir, "kopia.password", "secret\n", 0o600)
	missing := filepath.Join(dir, "kopia.config")
	file := "datasets: [DATA/libvirt]\nzfs:\n  binary: /bin/sh\nkopia:\n  config_file: " + missing + "\n  password_file: " + pw + "\n"
	cfg, notes, err := Options{}.ParseNotes([]byte(file), "fresh.yaml")
	if err != nil || cfg == nil {
		t.Fatalf("a missing kopia config refused: %v", err)
	}
	want := `fresh.yaml:5: kopia.config_file: "` + missing + `" does not exist yet: create the repository (or connect to one) with vmhistory repo create|connect`
	if lines := notes.Warnings.Lines(); len(lines) != 1 || !strings.HasPrefix(lines[0], want) {
		t.Errorf("warnings %q, want one starting %q", lines, want)
	}
	// The rest is still checked.
	_, err = Parse([]byte(strings.Replace(file, "datasets:", "keep_local: 0\ndatasets:", 1)), "fresh.yaml")
	if err == nil || !problems(t, err).Has("keep_local") || problems(t, err).Has("kopia.config_file") {
		t.Errorf("with keep_local 0: %v", err)
	}
}
