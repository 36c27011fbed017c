// Package config is vmhistory's YAML configuration file: its types, the
// defaults, loading, and validation that reports every problem at once with
// the key, the value and the line.
//
// A Config returned by Load or Parse is resolved: defaults are filled in and
// derived values are computed (each dataset's VM selection and replica
// dataset, keep_replica), so that the rest of the program reads plain fields
// and never re-implements a default. See example.yaml (printed by
// "vmhistory config example") for the file format.
package config

import (
	"strings"
	"time"
)

// Defaults. They are exported so that documentation, tests and the packages
// that use a Config agree with what Parse fills in.
const (
	// DefaultSnapshotFormat names snapshots like DATA/libvirt@2023-03-04_05:00:01,
	// the names the seed host has always used; it sorts chronologically and
	// holds the second, so two runs never collide.
	DefaultSnapshotFormat = "2006-01-02_15:04:05"
	// DefaultKeepLocal keeps the last 20 snapshots on this host, as the seed did.
	DefaultKeepLocal = 20
	// DefaultQuiesceMode leaves a fully resumable VM in the snapshot (see
	// QuiesceManagedSave).
	DefaultQuiesceMode = QuiesceManagedSave
	// DefaultSaveTimeout bounds saving (or suspending, freezing) one VM. Saving
	// writes the guest's RAM to disk: a few GiB take well under a minute on a
	// healthy host, so 5 minutes means something is stuck.
	DefaultSaveTimeout = 5 * time.Minute
	// DefaultResumeTimeout bounds starting (or resuming, thawing) one VM again.
	DefaultResumeTimeout = 5 * time.Minute
	// DefaultAgentWait bounds waiting, after a VM is started again, for a
	// guest agent that answered before it was stopped.
	DefaultAgentWait = 10 * time.Second
	// DefaultLibvirtURI is the system QEMU/KVM driver, the one virsh uses as root.
	DefaultLibvirtURI = "qemu:///system"
	// DefaultLibvirtSocket is libvirtd's read-write socket on Debian.
	DefaultLibvirtSocket = "/var/run/libvirt/libvirt-sock"
	// DefaultSSHUser is the replica user when an ssh:// target names none:
	// zfs receive needs root (or a zfs allow delegation for another user).
	DefaultSSHUser = "root"
	// DefaultSSHPort is the replica's ssh port when the target names none.
	DefaultSSHPort = 22
	// DefaultConnectTimeout is ssh's ConnectTimeout for the replica: a
	// replica that does not answer in 15 s is reported as offline.
	DefaultConnectTimeout = 15 * time.Second
	// DefaultCommandTimeout bounds one zfs command that does not move data
	// (list, get, snapshot, hold, release, destroy). They take a second
	// normally; minutes mean a hung pool or a hung ssh session, and the
	// nightly run must end and report rather than wait forever.
	DefaultCommandTimeout = 5 * time.Minute
	// DefaultSendTimeout bounds one zfs send | zfs receive. A nightly
	// incremental takes minutes, but the first full send of 1.4 TiB over a
	// 1 Gbit/s link takes about 4 hours, so the bound is generous; raise it
	// for a first full send over a slow link.
	DefaultSendTimeout = 24 * time.Hour
	// DefaultZFSBinary is looked up in PATH.
	DefaultZFSBinary = "zfs"
	// DefaultKopiaConfigFile keeps vmhistory's kopia repository connection
	// apart from root's own ~/.config/kopia, so that an interactive kopia
	// session cannot disconnect the nightly job.
	DefaultKopiaConfigFile = "/etc/vmhistory/kopia.config"
	// DefaultKopiaUser is the user part of the kopia source (user@host:path).
	// It is a label, not a unix account; root is what kopia would pick for a
	// job run by root.
	DefaultKopiaUser = "root"
	// DefaultMountPath is where "vmhistory mount" shows the timeline.
	DefaultMountPath = "/mnt/vmhistory"
	// DefaultStateDir holds the lock file and the record of which VMs a run
	// stopped, so that a crashed run is repaired by the next one.
	DefaultStateDir = "/var/lib/vmhistory"
)

// Config is the whole configuration file. Field comments describe the
// resolved value, after Parse has filled in defaults.
type Config struct {
	// Datasets are the ZFS datasets that hold VM disks; each gets one
	// snapshot per run. At least one.
	Datasets []Dataset `yaml:"datasets"`
	// SnapshotFormat is the Go time layout of snapshot names (the part after
	// the @). Only snapshots whose names parse with it are vmhistory's own:
	// retention never touches any other snapshot.
	SnapshotFormat string `yaml:"snapshot_format"`
	// KeepLocal is how many of vmhistory's snapshots to keep on this host, at least 1.
	KeepLocal int `yaml:"keep_local"`
	// KeepReplica is how many to keep on the replica. The file may say 0,
	// which resolves to KeepLocal; otherwise it is at least KeepLocal, because
	// the replica is the copy that outlives this host and should never hold
	// less history than it.
	KeepReplica int `yaml:"keep_replica"`
	// VMs selects the libvirt domains to quiesce, for datasets that do not
	// choose their own.
	VMs VMSelection `yaml:"vms"`
	// Quiesce says how VMs are brought to a consistent state for the snapshot.
	Quiesce Quiesce `yaml:"quiesce"`
	// Libvirt says how to reach libvirtd.
	Libvirt Libvirt `yaml:"libvirt"`
	// Replica is where snapshots are replicated with zfs send/receive; nil
	// when there is no replica.
	Replica *Replica `yaml:"replica,omitempty"`
	// Kopia is the kopia repository snapshots are uploaded to; nil when
	// there is none.
	Kopia *Kopia `yaml:"kopia,omitempty"`
	// ZFS says how to run the zfs command.
	ZFS ZFS `yaml:"zfs"`
	// Mount configures "vmhistory mount".
	Mount Mount `yaml:"mount"`
	// Metrics configures the Prometheus report of each run.
	Metrics Metrics `yaml:"metrics"`
	// StateDir holds the lock and the state that lets a run repair a crashed
	// one. An absolute path; created when missing.
	StateDir string `yaml:"state_dir"`
}

// Dataset is one ZFS dataset to snapshot. In the file it is either a plain
// name ("DATA/libvirt") or a mapping with name, vms and replica_dataset.
type Dataset struct {
	// Name is the dataset, like DATA/libvirt.
	Name string `yaml:"name"`
	// VMs selects the domains whose disks live on this dataset. The file may
	// leave it out to use the top-level vms; resolved, it is never nil.
	VMs *VMSelection `yaml:"vms"`
	// ReplicaDataset is the dataset on the replica that receives this one.
	// The file may leave it out: it then resolves to the replica target
	// itself when there is one dataset, and to <target>/<last component of
	// Name> when there are several. Empty when there is no replica.
	ReplicaDataset string `yaml:"replica_dataset,omitempty"`
}

// VMSelection is "all" or a list of libvirt domain names.
type VMSelection struct {
	// All selects every domain that has a disk under the dataset's
	// mountpoint; Names is then nil.
	All bool
	// Names are the selected domains when All is false. An explicit empty
	// list quiesces nothing: the snapshot is then only crash-consistent for
	// whatever runs on the dataset.
	Names []string
}

// AllVMs is the selection "all".
func AllVMs() VMSelection { return VMSelection{All: true} }

// String renders the selection as it is written in the file.
func (s VMSelection) String() string {
	if s.All {
		return "all"
	}
	return "[" + strings.Join(s.Names, ", ") + "]"
}

// Includes reports whether the domain called name is selected. With All it
// is always true: whether the domain's disks live on the dataset is for the
// caller to decide.
func (s VMSelection) Includes(name string) bool {
	if s.All {
		return true
	}
	for _, n := range s.Names {
		if n == name {
			return true
		}
	}
	return false
}

// QuiesceMode is how a VM is made consistent for the snapshot.
type QuiesceMode string

// The quiesce modes.
const (
	// QuiesceManagedSave saves the VM with libvirt's managed save and starts
	// it again after the snapshot. libvirt writes the state under
	// /var/lib/libvirt/qemu/save, which on a host whose dataset is mounted on
	// /var/lib/libvirt is inside the snapshot: the snapshot then holds a VM
	// that resumes exactly where it was.
	QuiesceManagedSave QuiesceMode = "managedsave"
	// QuiesceSave saves the VM state into a file on the dataset explicitly,
	// for layouts where libvirt's save directory is elsewhere.
	QuiesceSave QuiesceMode = "save"
	// QuiesceSuspend pauses the VM's CPUs for the snapshot: fast, and the
	// disks are consistent as after a power cut.
	QuiesceSuspend QuiesceMode = "suspend"
	// QuiesceFSFreeze asks the QEMU guest agent to freeze the guest's
	// filesystems: the VM keeps running and its filesystems are clean. Needs
	// the agent in every guest.
	QuiesceFSFreeze QuiesceMode = "fsfreeze"
	// QuiesceNone snapshots running VMs as they are (crash-consistent).
	QuiesceNone QuiesceMode = "none"
)

// QuiesceModes lists the valid modes, default first.
var QuiesceModes = []QuiesceMode{QuiesceManagedSave, QuiesceSave, QuiesceSuspend, QuiesceFSFreeze, QuiesceNone}

// Quiesce says how VMs are made consistent for the snapshot.
type Quiesce struct {
	// Mode is one of QuiesceModes.
	Mode QuiesceMode `yaml:"mode"`
	// SaveTimeout bounds saving, suspending or freezing one VM.
	SaveTimeout time.Duration `yaml:"save_timeout"`
	// ResumeTimeout bounds starting, resuming or thawing one VM.
	ResumeTimeout time.Duration `yaml:"resume_timeout"`
	// AgentWait is how long a VM that was stopped (saved, suspended) and
	// whose guest agent answered before is given for its agent to answer
	// again once started: its downtime ends then. 0 turns it off.
	AgentWait time.Duration `yaml:"agent_wait"`
	// Parallel is how many VMs are quiesced (and brought back) at once;
	// 0 means all of them.
	Parallel int `yaml:"parallel"`
}

// Libvirt says how to reach libvirtd.
type Libvirt struct {
	// URI is the connection URI given to libvirt, like qemu:///system.
	URI string `yaml:"uri"`
	// Socket is libvirtd's unix socket, an absolute path.
	Socket string `yaml:"socket"`
}

// Replica is the second machine (or second pool) that receives every
// snapshot with zfs send/receive.
type Replica struct {
	// Target is where datasets are received.
	Target ReplicaTarget `yaml:"target"`
	// KnownHosts is the ssh known_hosts file holding the replica's host key.
	// Required for ssh targets: vmhistory runs ssh with strict host key
	// checking, so a replaced replica is refused instead of trusted.
	KnownHosts string `yaml:"known_hosts,omitempty"`
	// IdentityFile is the ssh private key; empty means ssh's default keys.
	IdentityFile string `yaml:"identity_file,omitempty"`
	// ConnectTimeout is ssh's ConnectTimeout.
	ConnectTimeout time.Duration `yaml:"connect_timeout"`
	// CommandTimeout bounds one zfs command on the replica that does not
	// move data (see DefaultCommandTimeout); a send/receive is bounded by
	// ZFS.SendTimeout.
	CommandTimeout time.Duration `yaml:"command_timeout"`
}

// Kopia is the kopia repository every snapshot is uploaded to. The
// repository itself (Google Drive, S3, a path...) is connected once with the
// kopia CLI into ConfigFile; vmhistory only opens it.
type Kopia struct {
	// ConfigFile is the kopia repository configuration (kopia --config-file).
	ConfigFile string `yaml:"config_file"`
	// PasswordFile holds the repository password. It must be readable and
	// writable by its owner only.
	PasswordFile string `yaml:"password_file"`
	// Host and User make the kopia source user@host:<dataset mountpoint>
	// under which every snapshot of a dataset is recorded. Host defaults to
	// this machine's short hostname in lower case, as kopia itself does, so
	// that kopia's CLI lists the same sources.
	Host string `yaml:"host"`
	User string `yaml:"user"`
	// Compression is the kopia compression algorithm set in the policy of
	// vmhistory's sources: a name from kopia's compression registry, "none",
	// or empty to leave the policy as it is.
	Compression string `yaml:"compression,omitempty"`
	// Splitter is the kopia splitter algorithm set in the policy of
	// vmhistory's sources, or empty for the repository's default
	// (DYNAMIC-4M-BUZHASH). For VM images a fixed splitter matching the ZFS
	// recordsize (FIXED-128K) stores far less per night; "vmhistory bench
	// backup" measures it on your data.
	Splitter string `yaml:"splitter,omitempty"`
	// Incremental says how a night whose previous snapshot kopia holds is
	// uploaded: "stream" (the default) reads only what the ZFS incremental
	// stream from that snapshot says changed, for files split by a FIXED-*
	// splitter; "full" lets kopia read every file whose size or time
	// changed, as "kopia snapshot create" does.
	Incremental string `yaml:"incremental,omitempty"`
	// VerifyEvery re-reads the whole snapshot after a stream upload one
	// night in N (by the number of kopia snapshots of the dataset) and
	// compares it with what the stream path wrote; 0 never, 1 every night.
	VerifyEvery int `yaml:"verify_every"`
}

// The kopia.incremental values.
const (
	IncrementalStream = "stream"
	IncrementalFull   = "full"
)

// DefaultVerifyEvery: a full re-read once a week.
const DefaultVerifyEvery = 7

// ZFS says how to run the zfs command.
type ZFS struct {
	// Binary is the zfs program: a name looked up in PATH or an absolute path.
	Binary string `yaml:"binary"`
	// CommandTimeout bounds one local zfs command that does not move data.
	CommandTimeout time.Duration `yaml:"command_timeout"`
	// SendTimeout bounds one zfs send | zfs receive, local or to the replica.
	SendTimeout time.Duration `yaml:"send_timeout"`
}

// Mount configures "vmhistory mount".
type Mount struct {
	// Path is the default mountpoint of the timeline, an absolute path.
	Path string `yaml:"path"`
}

// Metrics configures the Prometheus report of each run.
type Metrics struct {
	// Textfile, when set, is a file vmhistory rewrites after each run for
	// node_exporter's textfile collector. Its directory must exist and its
	// name end in .prom (the collector reads nothing else).
	Textfile string `yaml:"textfile,omitempty"`
}

// Default returns the configuration an empty file would mean, without
// datasets (which have no default) and without replica or kopia (which are
// off unless configured).
func Default() *Config {
	return &Config{
		SnapshotFormat: DefaultSnapshotFormat,
		KeepLocal:      DefaultKeepLocal,
		VMs:            AllVMs(),
		Quiesce: Quiesce{
			Mode:          DefaultQuiesceMode,
			SaveTimeout:   DefaultSaveTimeout,
			ResumeTimeout: DefaultResumeTimeout,
			AgentWait:     DefaultAgentWait,
		},
		Libvirt: Libvirt{URI: DefaultLibvirtURI, Socket: DefaultLibvirtSocket},
		ZFS: ZFS{
			Binary:         DefaultZFSBinary,
			CommandTimeout: DefaultCommandTimeout,
			SendTimeout:    DefaultSendTimeout,
		},
		Mount:    Mount{Path: DefaultMountPath},
		StateDir: DefaultStateDir,
	}
}

// defaultReplica is what a replica section starts from before the file's
// keys are applied.
func defaultReplica() *Replica {
	return &Replica{ConnectTimeout: DefaultConnectTimeout, CommandTimeout: DefaultCommandTimeout}
}

// defaultKopia is what a kopia section starts from before the file's keys
// are applied; Host is filled in after decoding, only when left empty, so a
// failing os.Hostname matters only to files that need it.
func defaultKopia() *Kopia {
	return &Kopia{ConfigFile: DefaultKopiaConfigFile, User: DefaultKopiaUser, Incremental: IncrementalStream, VerifyEvery: DefaultVerifyEvery}
}

// SnapshotName is the snapshot part (after the @) of the snapshot taken at
// t. t's location is used as is; the nightly run passes local time, as the
// seed host's names (05:00) are local.
func (c *Config) SnapshotName(t time.Time) string {
	return t.Format(c.SnapshotFormat)
}

// ParseSnapshotName returns the time encoded in a snapshot name (the part
// after the @), read in local time, and whether the name is one of
// vmhistory's: a name that does not parse with SnapshotFormat, or does not
// format back to itself, belongs to someone else and must be left alone.
func (c *Config) ParseSnapshotName(name string) (time.Time, bool) {
	t, err := time.ParseInLocation(c.SnapshotFormat, name, time.Local)
	if err != nil || t.Format(c.SnapshotFormat) != name {
		return time.Time{}, false
	}
	return t, true
}

// DatasetNames returns the names of the configured datasets, in file order.
func (c *Config) DatasetNames() []string {
	names := make([]string, len(c.Datasets))
	for i, d := range c.Datasets {
		names[i] = d.Name
	}
	return names
}
