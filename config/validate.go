package config

import (
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode"

	"github.com/kopia/kopia/repo/compression"
	"github.com/kopia/kopia/repo/splitter"
)

// validator fills in derived values and checks a decoded Config. It shares
// the decoder's record of keys and lines, so that a problem found here is
// reported at the line the value came from.
type validator struct {
	d     *decoder
	cfg   *Config
	opts  Options
	notes *Notes
}

// warn records something the admin should know that does not make the
// file invalid.
func (v *validator) warn(key, value, format string, args ...any) {
	v.notes.Warnings.addf(key, value, v.lineOf(key), format, args...)
}

// fail reports a problem with the value at key. The line is the key's, or
// that of the nearest enclosing key present in the file, so that a missing
// required key points at its section. A key that already failed to decode
// is not reported again.
func (v *validator) fail(key, value, format string, args ...any) {
	if v.d.failed[key] {
		return
	}
	v.d.failed[key] = true
	v.d.errs.addf(key, value, v.lineOf(key), format, args...)
}

func (v *validator) lineOf(key string) int {
	for k := key; k != ""; k = parentKey(k) {
		if p, ok := v.d.seen[k]; ok {
			return p.line
		}
	}
	return 0
}

// parentKey strips the last component of a key path:
// "datasets[1].name" → "datasets[1]" → "datasets" → "".
func parentKey(key string) string {
	i := strings.LastIndexAny(key, ".[")
	if i < 0 {
		return ""
	}
	return key[:i]
}

// inFile reports whether the file set key (not to null).
func (v *validator) inFile(key string) bool {
	p, ok := v.d.seen[key]
	return ok && !isNull(p.node)
}

func (v *validator) run() {
	c := v.cfg
	v.datasets()
	if err := checkSnapshotFormat(c.SnapshotFormat); err != nil {
		v.fail("snapshot_format", c.SnapshotFormat, "%v", err)
	} else {
		v.snapshotNameLengths()
	}
	v.keep()
	v.vmNames("vms", c.VMs)
	v.quiesce()
	v.libvirt()
	if c.Replica != nil {
		v.replica()
	}
	if c.Kopia != nil {
		v.kopia()
	}
	v.zfs()
	v.absPath("mount.path", c.Mount.Path, false)
	if c.Mount.Path == "/" {
		v.fail("mount.path", c.Mount.Path, "must not be /; the timeline needs a directory of its own")
	}
	v.metrics()
	v.absPath("state_dir", c.StateDir, false)
}

func (v *validator) datasets() {
	c := v.cfg
	if len(c.Datasets) == 0 {
		v.fail("datasets", "", "is required: list the ZFS datasets that hold the VM disks, like [DATA/libvirt]")
		return
	}
	first := map[string]string{}
	for i := range c.Datasets {
		ds := &c.Datasets[i]
		key := indexKey("datasets", i)
		nameKey := joinKey(key, "name")
		if v.d.plain[key] {
			nameKey = key
		}
		switch err := checkDatasetName(ds.Name); {
		case ds.Name == "" && !v.d.plain[key]:
			v.fail(nameKey, "", "is required: the ZFS dataset, like DATA/libvirt")
		case err != nil:
			v.fail(nameKey, ds.Name, "%v", err)
		default:
			if prev, dup := first[ds.Name]; dup {
				v.fail(nameKey, ds.Name, "is listed twice (also %s); list each dataset once", prev)
			} else {
				first[ds.Name] = nameKey
			}
		}
		if ds.VMs == nil {
			vms := c.VMs
			vms.Names = append([]string(nil), c.VMs.Names...)
			ds.VMs = &vms
		} else {
			v.vmNames(joinKey(key, "vms"), *ds.VMs)
		}
		if ds.ReplicaDataset != "" && c.Replica == nil {
			v.fail(joinKey(key, "replica_dataset"), ds.ReplicaDataset, "is set but there is no replica section; add replica: with a target, or remove it")
		}
	}
}

// snapshotNameLengths checks that dataset@snapshot fits ZFS's name limit.
func (v *validator) snapshotNameLengths() {
	snap := time.Date(2099, 12, 31, 23, 59, 59, 0, time.UTC).Format(v.cfg.SnapshotFormat)
	for i, ds := range v.cfg.Datasets {
		if n := len(ds.Name) + 1 + len(snap); ds.Name != "" && n > maxZFSNameLen {
			v.fail(joinKey(indexKey("datasets", i), "name"), ds.Name,
				"with snapshot names like %q makes %d characters; ZFS allows at most %d", snap, n, maxZFSNameLen)
		}
	}
}

func (v *validator) keep() {
	c := v.cfg
	if v.d.failed["keep_local"] {
		return // keep_replica cannot be judged against a keep_local that is not there
	}
	if c.KeepLocal < 1 {
		v.fail("keep_local", strconv.Itoa(c.KeepLocal), "must be at least 1: the newest snapshot is the base of the next incremental send")
		return
	}
	switch {
	case c.KeepReplica == 0:
		c.KeepReplica = c.KeepLocal
	case c.KeepReplica < 0:
		v.fail("keep_replica", strconv.Itoa(c.KeepReplica), "must be 0 (the same as keep_local) or at least keep_local (%d)", c.KeepLocal)
	case c.KeepReplica < c.KeepLocal:
		v.fail("keep_replica", strconv.Itoa(c.KeepReplica),
			"is less than keep_local (%d); the replica outlives this host and must keep at least as much history (0 means the same as keep_local)", c.KeepLocal)
	}
}

// vmNames checks a list of libvirt domain names. libvirt allows almost any
// name; what is refused here cannot be a domain name or cannot be one that
// anybody meant (empty, a path, control characters).
func (v *validator) vmNames(key string, s VMSelection) {
	if s.All {
		return
	}
	first := map[string]int{}
	for i, name := range s.Names {
		ik := indexKey(key, i)
		switch {
		case strings.TrimSpace(name) == "":
			v.fail(ik, name, "is an empty domain name")
		case strings.Contains(name, "/"):
			v.fail(ik, name, "contains /, which libvirt does not allow in domain names")
		case strings.IndexFunc(name, unicode.IsControl) >= 0:
			v.fail(ik, name, "contains a control character")
		case name == "all":
			v.fail(ik, name, "is not a domain name inside a list; write vms: all (without brackets) to select every VM")
		default:
			if prev, dup := first[name]; dup {
				v.fail(ik, name, "is listed twice (also %s)", indexKey(key, prev))
			} else {
				first[name] = i
			}
		}
	}
}

func (v *validator) quiesce() {
	q := v.cfg.Quiesce
	valid := false
	names := make([]string, len(QuiesceModes))
	for i, m := range QuiesceModes {
		names[i] = string(m)
		valid = valid || q.Mode == m
	}
	if !valid {
		msg := "must be one of " + strings.Join(names, ", ")
		if s := closest(string(q.Mode), names); s != "" {
			msg = fmt.Sprintf("is not a quiesce mode; did you mean %q? (%s)", s, msg)
		}
		v.fail("quiesce.mode", string(q.Mode), "%s", msg)
	}
	v.positive("quiesce.save_timeout", q.SaveTimeout)
	v.positive("quiesce.resume_timeout", q.ResumeTimeout)
	if q.Parallel < 0 {
		v.fail("quiesce.parallel", fmt.Sprint(q.Parallel), "must be 0 (all VMs at once) or more")
	}
	if q.AgentWait < 0 {
		v.fail("quiesce.agent_wait", q.AgentWait.String(), "must be 0 (do not wait for guest agents) or more")
	}
}

func (v *validator) libvirt() {
	l := v.cfg.Libvirt
	if u, err := url.Parse(l.URI); err != nil || u.Scheme == "" {
		v.fail("libvirt.uri", l.URI, "is not a libvirt connection URI, like qemu:///system")
	}
	v.absPath("libvirt.socket", l.Socket, false)
}

func (v *validator) replica() {
	r := v.cfg.Replica
	t := r.Target
	if t.Dataset == "" {
		// Either left out or already reported as unparsable.
		v.fail("replica.target", "", "is required: a dataset on this host (BACKUP/libvirt) or ssh://user@host/POOL/dataset")
	}
	v.positive("replica.connect_timeout", r.ConnectTimeout)
	v.positive("replica.command_timeout", r.CommandTimeout)
	if t.Dataset != "" && t.Local {
		// A local target that was meant to be remote parses as a dataset
		// ("backup.example.org/BACKUP/libvirt"); ssh settings give it away.
		for _, k := range []struct{ key, value string }{{"replica.known_hosts", r.KnownHosts}, {"replica.identity_file", r.IdentityFile}} {
			if k.value != "" {
				v.fail(k.key, k.value, "is set, but replica.target %q is a dataset on this host; for a remote replica write ssh://user@host/POOL/dataset", t.Dataset)
			}
		}
	}
	if t.Dataset != "" && !t.Local {
		if r.KnownHosts == "" {
			port := ""
			if t.Port != DefaultSSHPort {
				port = fmt.Sprintf("-p %d ", t.Port)
			}
			v.fail("replica.known_hosts", "", "is required for an ssh target: the file with %s's host key (ssh-keyscan %s%s > /etc/vmhistory/known_hosts, then compare the fingerprint)", t.Host, port, t.Host)
		} else {
			v.absPath("replica.known_hosts", r.KnownHosts, true)
		}
		if r.IdentityFile != "" {
			v.absPath("replica.identity_file", r.IdentityFile, true)
		}
	}
	if t.Dataset == "" {
		return
	}
	v.replicaDatasets()
}

// replicaDatasets resolves each dataset's replica dataset and checks that
// they are distinct, and, for a target on this host, that no replica lands
// on or around a source.
func (v *validator) replicaDatasets() {
	c, t := v.cfg, v.cfg.Replica.Target
	first := map[string]string{}
	for i := range c.Datasets {
		ds := &c.Datasets[i]
		key := joinKey(indexKey("datasets", i), "replica_dataset")
		explicit := ds.ReplicaDataset != ""
		if explicit {
			if err := checkDatasetName(ds.ReplicaDataset); err != nil {
				v.fail(key, ds.ReplicaDataset, "%v", err)
				continue
			}
		} else {
			if ds.Name == "" || checkDatasetName(ds.Name) != nil {
				continue // reported already
			}
			if len(c.Datasets) == 1 {
				ds.ReplicaDataset = t.Dataset
			} else {
				ds.ReplicaDataset = t.Dataset + "/" + ds.Name[strings.LastIndex(ds.Name, "/")+1:]
			}
		}
		where := "replica.target"
		if explicit {
			where = key
		}
		if isPoolRoot(ds.ReplicaDataset) {
			v.fail(where, ds.ReplicaDataset, "is a pool's root dataset; zfs receive cannot write there without -F, which vmhistory never uses: name a dataset below it, like %s/%s", ds.ReplicaDataset, lastComponent(ds.Name))
			continue
		}
		if prev, dup := first[ds.ReplicaDataset]; dup {
			v.fail(key, ds.ReplicaDataset, "is also the replica of %s; give one of them its own replica_dataset", prev)
			continue
		}
		first[ds.ReplicaDataset] = ds.Name
		if t.Local {
			for _, src := range c.Datasets {
				if src.Name != "" && (isInside(ds.ReplicaDataset, src.Name) || isInside(src.Name, ds.ReplicaDataset)) {
					v.fail(where, ds.ReplicaDataset, "would put the replica of %s on or around the source dataset %s on this host; choose a dataset outside it", ds.Name, src.Name)
					break
				}
			}
		}
	}
}

func lastComponent(name string) string { return name[strings.LastIndex(name, "/")+1:] }

func (v *validator) kopia() {
	k := v.cfg.Kopia
	v.absPath("kopia.config_file", k.ConfigFile, false)
	if k.PasswordFile == "" {
		v.fail("kopia.password_file", "", "is required: a file holding the kopia repository password, mode 600")
	} else {
		v.absPath("kopia.password_file", k.PasswordFile, false)
	}
	if k.Host == "" && !v.inFile("kopia.host") {
		h, err := os.Hostname()
		if err != nil {
			v.fail("kopia.host", "", "cannot default to this machine's name (%v); set it", err)
		}
		// kopia's own default (repo.GetDefaultHostName): short name, lower case.
		k.Host = strings.ToLower(strings.Split(h, ".")[0])
	}
	v.kopiaLabel("kopia.host", k.Host)
	v.kopiaLabel("kopia.user", k.User)
	if k.Compression != "" && k.Compression != "none" {
		name := compression.Name(k.Compression)
		if _, ok := compression.ByName[name]; !ok {
			v.fail("kopia.compression", k.Compression, "is not a kopia compression algorithm%s; choose one of: none, %s",
				didYouMean(k.Compression, compressionNames()), strings.Join(compressionNames(), ", "))
		} else if compression.IsDeprecated[name] {
			v.fail("kopia.compression", k.Compression, "is deprecated in kopia; choose one of: none, %s", strings.Join(compressionNames(), ", "))
		}
	}
	if k.Splitter != "" && splitter.GetFactory(k.Splitter) == nil {
		var names []string
		for _, n := range splitter.SupportedAlgorithms() {
			// FIXED and DYNAMIC are kopia's legacy aliases: accepted, not advertised.
			if strings.Contains(n, "-") {
				names = append(names, n)
			}
		}
		v.fail("kopia.splitter", k.Splitter, "is not a kopia splitter%s; choose one of: %s (leave it out for the repository default, %s)",
			didYouMean(k.Splitter, names), strings.Join(names, ", "), splitter.DefaultAlgorithm)
	}
	switch k.Incremental {
	case "":
		k.Incremental = IncrementalStream
	case IncrementalStream, IncrementalFull:
	default:
		v.fail("kopia.incremental", k.Incremental, "is neither %q (read what the ZFS stream says changed) nor %q (kopia reads every changed file)", IncrementalStream, IncrementalFull)
	}
	if k.VerifyEvery < 0 {
		v.fail("kopia.verify_every", strconv.Itoa(k.VerifyEvery), "must be 0 (never), 1 (every night) or N (one night in N)")
	}
}

// kopiaLabel checks the user or host part of a kopia source, which kopia
// writes as user@host:path.
func (v *validator) kopiaLabel(key, value string) {
	switch {
	case value == "":
		v.fail(key, value, "must not be empty")
	case strings.ContainsAny(value, "@: \t/"):
		v.fail(key, value, "must not contain @, :, / or spaces: kopia shows sources as user@host:path")
	}
}

// compressionNames lists kopia's current (not deprecated) compression algorithms.
func compressionNames() []string {
	var names []string
	for n := range compression.ByName {
		if !compression.IsDeprecated[n] {
			names = append(names, string(n))
		}
	}
	sort.Strings(names)
	return names
}

func didYouMean(s string, candidates []string) string {
	if c := closest(s, candidates); c != "" {
		return fmt.Sprintf(" (did you mean %q?)", c)
	}
	return ""
}

func (v *validator) zfs() {
	z := v.cfg.ZFS
	switch {
	case z.Binary == "":
		v.fail("zfs.binary", "", "must not be empty; the default is %q", DefaultZFSBinary)
	case strings.Contains(z.Binary, "/") && !filepath.IsAbs(z.Binary):
		v.fail("zfs.binary", z.Binary, "must be a program name looked up in PATH (zfs) or an absolute path")
	case !v.opts.SkipFileChecks:
		if _, err := exec.LookPath(z.Binary); err != nil {
			v.fail("zfs.binary", z.Binary, "is not an executable program here (%v)", unwrapExecError(err))
		}
	}
	v.positive("zfs.command_timeout", z.CommandTimeout)
	v.positive("zfs.send_timeout", z.SendTimeout)
}

func unwrapExecError(err error) error {
	if e, ok := err.(*exec.Error); ok {
		return e.Err
	}
	return err
}

func (v *validator) metrics() {
	m := v.cfg.Metrics
	if m.Textfile == "" {
		return
	}
	if !v.absPath("metrics.textfile", m.Textfile, false) {
		return
	}
	if !strings.HasSuffix(m.Textfile, ".prom") {
		v.fail("metrics.textfile", m.Textfile, "must end in .prom: node_exporter's textfile collector reads only *.prom files")
		return
	}
	if v.opts.SkipFileChecks {
		return
	}
	dir := filepath.Dir(m.Textfile)
	if fi, err := os.Stat(dir); err != nil {
		v.fail("metrics.textfile", m.Textfile, "is in %s, which %s (it is node_exporter's --collector.textfile.directory)", dir, describeStatError(err))
	} else if !fi.IsDir() {
		v.fail("metrics.textfile", m.Textfile, "is in %s, which is not a directory", dir)
	}
}

// positive checks a timeout.
func (v *validator) positive(key string, d time.Duration) {
	if d <= 0 {
		v.fail(key, formatDuration(d), "must be more than zero")
	}
}

// absPath checks that a path is absolute: vmhistory runs from cron and
// systemd, whose working directory is nobody's guess. With mustExist it
// also checks, unless file checks are skipped, that the path is an existing
// regular file.
func (v *validator) absPath(key, path string, mustExist bool) bool {
	if path == "" {
		v.fail(key, path, "must not be empty")
		return false
	}
	if !filepath.IsAbs(path) {
		v.fail(key, path, "must be an absolute path (vmhistory runs from cron and systemd, whose working directory is /)")
		return false
	}
	if mustExist && !v.opts.SkipFileChecks {
		fi, err := os.Stat(path)
		if err != nil {
			v.fail(key, path, "%s", describeStatError(err))
			return false
		}
		if !fi.Mode().IsRegular() {
			v.fail(key, path, "is not a regular file")
			return false
		}
	}
	return true
}

func describeStatError(err error) string {
	switch {
	case os.IsNotExist(err):
		return "does not exist"
	case os.IsPermission(err):
		return "cannot be read: permission denied (run as root?)"
	}
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return "cannot be read: " + pe.Err.Error()
	}
	return "cannot be read: " + err.Error()
}

// fileChecks looks at the files the configuration refers to. They run last,
// and only when Options.SkipFileChecks is false, so that a file written for
// another machine can still be checked.
func (v *validator) fileChecks() {
	if v.opts.SkipFileChecks {
		return
	}
	if r := v.cfg.Replica; r != nil && !r.Target.Local && r.KnownHosts != "" && !v.d.failed["replica.known_hosts"] {
		if fi, err := os.Stat(r.KnownHosts); err == nil && fi.Size() == 0 {
			v.fail("replica.known_hosts", r.KnownHosts, "is empty; add %s's host key (ssh-keyscan %s, then compare the fingerprint)", r.Target.Host, r.Target.Host)
		}
	}
	if r := v.cfg.Replica; r != nil && !r.Target.Local && r.IdentityFile != "" && !v.d.failed["replica.identity_file"] {
		// ssh itself refuses a key that others can read ("UNPROTECTED
		// PRIVATE KEY FILE"); say so now rather than at night.
		v.privateFile("replica.identity_file", r.IdentityFile, 0o077)
	}
	if k := v.cfg.Kopia; k != nil && !v.opts.SkipKopiaFileChecks {
		if k.PasswordFile != "" && !v.d.failed["kopia.password_file"] {
			if _, err := os.Lstat(k.PasswordFile); os.IsNotExist(err) && os.Getenv(kopiaPasswordEnv) != "" {
				// kopia's rule, which vmhistory follows: the environment
				// variable wins over the file.
				v.warn("kopia.password_file", k.PasswordFile, "does not exist; $%s is set and is used instead", kopiaPasswordEnv)
			} else if os.IsNotExist(err) {
				v.fail("kopia.password_file", k.PasswordFile, "does not exist; create it with a new password: (umask 077; head -c 30 /dev/urandom | base64 > %s), or set $%s", k.PasswordFile, kopiaPasswordEnv)
			} else {
				v.privateFile("kopia.password_file", k.PasswordFile, 0o066)
			}
		}
		if k.ConfigFile != "" && !v.d.failed["kopia.config_file"] {
			switch _, err := os.Stat(k.ConfigFile); {
			case os.IsNotExist(err):
				// A fresh install: the repository is created after the
				// configuration is checked, and only the upload needs it.
				v.warn("kopia.config_file", k.ConfigFile, "does not exist yet: create the repository (or connect to one) with vmhistory repo create|connect gdrive|s3|sftp|webdav|rclone|filesystem (see vmhistory repo create --help); until then the nightly upload step fails and the rest runs")
			case err != nil:
				v.fail("kopia.config_file", k.ConfigFile, "%s", describeStatError(err))
			}
		}
	}
}

// kopiaPasswordEnv is the environment variable kopia reads the repository
// password from (kopiarepo.PasswordEnv); when set it wins over
// kopia.password_file.
const kopiaPasswordEnv = "KOPIA_PASSWORD"

// privateFile checks that a secret file exists, is a non-empty regular
// file, and has none of the permission bits in forbidden (group and other
// read/write). A password readable by every local user defeats the
// repository's encryption, so it is refused, not warned about.
func (v *validator) privateFile(key, path string, forbidden fs.FileMode) {
	fi, err := os.Stat(path)
	if err != nil {
		v.fail(key, path, "%s", describeStatError(err))
		return
	}
	if !fi.Mode().IsRegular() {
		v.fail(key, path, "is not a regular file")
		return
	}
	perm := fi.Mode().Perm()
	if bad := perm & forbidden; bad != 0 {
		var what []string
		if bad&0o044 != 0 {
			what = append(what, "readable")
		}
		if bad&0o022 != 0 {
			what = append(what, "writable")
		}
		if bad&0o011 != 0 {
			what = append(what, "executable")
		}
		v.fail(key, path, "is %s by group or other (mode %04o); run: chmod 600 %s", strings.Join(what, " and "), perm, path)
		return
	}
	if fi.Size() == 0 {
		v.fail(key, path, "is empty")
	}
}
