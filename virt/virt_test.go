package virt

// These tests run against the real libvirtd (started by
// scripts/setup-test-env.sh) with its test driver, each on a private
// node-file connection (test:///default is shared by all connections open
// at once, other test binaries included). A node-file connection keeps its
// own state, so every assertion goes through the Conn the code under test
// used.

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"

	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/testenv"
)

// dial opens a private test-driver connection without domains and defines
// vms on it.
func dial(t *testing.T, vms ...testenv.TestVM) *Conn {
	t.Helper()
	testenv.RequireLibvirt(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := Dial(ctx, testenv.LibvirtSocket, testenv.PrivateTestDriver(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Error(err)
		}
	})
	testenv.DefineTestVMs(t, c.Client(), vms...)
	return c
}

func fileVM(name, state string, disks ...string) testenv.TestVM {
	vm := testenv.TestVM{Name: name, State: state}
	for _, d := range disks {
		vm.Disks = append(vm.Disks, testenv.TestDisk{Path: d})
	}
	return vm
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func domainState(t *testing.T, c *Conn, name string) Domain {
	t.Helper()
	d, err := c.Domain(ctxT(t), name)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func names(doms []Domain) []string {
	out := make([]string, len(doms))
	for i, d := range doms {
		out[i] = d.Name
	}
	return out
}

func TestDialErrors(t *testing.T) {
	ctx := ctxT(t)
	missing := filepath.Join(t.TempDir(), "libvirt-sock")
	_, err := Dial(ctx, missing, "test:///default")
	if err == nil || !strings.Contains(err.Error(), missing) || !strings.Contains(err.Error(), "does not exist") {
		t.Fatalf("missing socket: %v", err)
	}

	// A socket file nobody listens on any more (libvirtd died).
	dead := filepath.Join(t.TempDir(), "dead-sock")
	l, err := net.Listen("unix", dead)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	_, err = Dial(ctx, dead, "test:///default")
	if err == nil || !strings.Contains(err.Error(), dead) || !strings.Contains(err.Error(), "is libvirtd running") {
		t.Fatalf("dead socket: %v", err)
	}

	testenv.RequireLibvirt(t)
	_, err = Dial(ctx, testenv.LibvirtSocket, "nosuchdriver:///x")
	if err == nil || !strings.Contains(err.Error(), "nosuchdriver:///x") {
		t.Fatalf("bad URI: %v", err)
	}
}

func TestConfigModesAreKnown(t *testing.T) {
	for _, m := range config.QuiesceModes {
		if _, err := ParseMode(string(m)); err != nil {
			t.Error(err)
		}
	}
	if Mode(config.DefaultQuiesceMode) != Modes[0] {
		t.Errorf("default mode: config %s, virt %s", config.DefaultQuiesceMode, Modes[0])
	}
	if _, err := ParseMode("hibernate"); err == nil || !strings.Contains(err.Error(), "hibernate") {
		t.Errorf("ParseMode(hibernate) = %v", err)
	}
}

func TestDomains(t *testing.T) {
	dir := t.TempDir()
	c := dial(t,
		testenv.TestVM{Name: "web01", Disks: []testenv.TestDisk{
			{Path: filepath.Join(dir, "web01.qcow2")},
			{Type: "block", Path: "/dev/zvol/tank/vm/web01-data"},
			{Type: "network", Path: "export1"},
		}},
		fileVM("off", testenv.VMShutoff, filepath.Join(dir, "off.img")),
		fileVM("paused", testenv.VMPaused, filepath.Join(dir, "paused.img")),
	)
	doms, err := c.Domains(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := names(doms), []string{"off", "paused", "web01"}; !slices.Equal(got, want) {
		t.Fatalf("domains %v, want %v", got, want)
	}
	byName := map[string]Domain{}
	for _, d := range doms {
		byName[d.Name] = d
	}
	if s := byName["web01"].State; s != StateRunning || s.String() != "running" {
		t.Errorf("web01 state %v", s)
	}
	if s := byName["off"].State; s != StateShutoff || s.String() != "shut off" {
		t.Errorf("off state %v", s)
	}
	if s := byName["paused"].State; s != StatePaused {
		t.Errorf("paused state %v", s)
	}
	if u := byName["web01"].UUID; len(u) != 36 || strings.Count(u, "-") != 4 {
		t.Errorf("uuid %q", u)
	}
	want := []Disk{
		{Type: "file", Device: "disk", Source: filepath.Join(dir, "web01.qcow2"), Target: "vda"},
		{Type: "block", Device: "disk", Source: "/dev/zvol/tank/vm/web01-data", Target: "vdb"},
		{Type: "network", Device: "disk", Source: "nbd://127.0.0.1:10809/export1", Target: "vdc"},
	}
	if got := byName["web01"].Disks; !slices.Equal(got, want) {
		t.Errorf("disks\n got %+v\nwant %+v", got, want)
	}

	// The managed-save flag.
	if byName["web01"].ManagedSave {
		t.Error("web01 has a managed-save image before any save")
	}
	if err := c.Client().DomainManagedSave(byName["web01"].ref, 0); err != nil {
		t.Fatal(err)
	}
	if d := domainState(t, c, "web01"); d.State != StateShutoff || !d.ManagedSave {
		t.Errorf("after managed save: %v managedsave=%v", d.State, d.ManagedSave)
	}

	_, err = c.Domain(ctxT(t), "nope")
	if !IsNotFound(err) || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("Domain(nope) = %v", err)
	}
}

func TestDomainsUnder(t *testing.T) {
	base := t.TempDir()
	mnt := filepath.Join(base, "data", "libvirt")
	lib := filepath.Join(base, "data", "lib")
	// A path into the mountpoint through a symbolic link, as when
	// /var/lib/libvirt/images points into the dataset.
	link := filepath.Join(base, "images")
	if err := os.MkdirAll(filepath.Join(mnt, "linked"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(mnt, "linked"), link); err != nil {
		t.Fatal(err)
	}
	c := dial(t,
		fileVM("web01", "", filepath.Join(mnt, "images", "web01.qcow2")),
		fileVM("db01", testenv.VMShutoff, filepath.Join(mnt, "db01.raw")),
		fileVM("libonly", "", filepath.Join(lib, "libonly.img")),
		fileVM("prefix", "", filepath.Join(base, "data", "libvirt2", "prefix.img")),
		fileVM("viasymlink", "", filepath.Join(link, "viasymlink.img")),
		testenv.TestVM{Name: "zvm", Disks: []testenv.TestDisk{{Type: "block", Path: "/dev/zvol/DATA/libvirt/zvm-disk"}}},
		testenv.TestVM{Name: "mixed", Disks: []testenv.TestDisk{
			{Path: filepath.Join(mnt, "mixed.qcow2")},
			{Type: "block", Path: "/dev/zvol/DATA/libvirt/sub/mixed-data"},
		}},
		testenv.TestVM{Name: "otherzvol", Disks: []testenv.TestDisk{{Type: "block", Path: "/dev/zvol/DATA/libvirt2/x"}}},
		testenv.TestVM{Name: "netvm", Disks: []testenv.TestDisk{{Type: "network", Path: "e"}}},
	)

	// A volume disk in a storage pool whose directory is on the dataset.
	lv := c.Client()
	pool, err := lv.StoragePoolDefineXML("<pool type='dir'><name>vmpool</name><target><path>"+filepath.Join(mnt, "pool")+"</path></target></pool>", 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := lv.StoragePoolCreate(pool, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := lv.StorageVolCreateXML(pool, "<volume><name>volvm.qcow2</name><capacity>1048576</capacity></volume>", 0); err != nil {
		t.Fatal(err)
	}
	testenv.DefineTestVMs(t, lv,
		testenv.TestVM{Name: "volvm", Disks: []testenv.TestDisk{{Type: "volume", Path: "vmpool/volvm.qcow2"}}},
		testenv.TestVM{Name: "lostvol", Disks: []testenv.TestDisk{{Type: "volume", Path: "nopool/x.qcow2"}}},
	)

	ds := Dataset{Name: "DATA/libvirt", Mountpoint: mnt}
	sel, err := c.DomainsUnder(ctxT(t), ds, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := sel.Names(), []string{"db01", "mixed", "viasymlink", "volvm", "web01"}; !slices.Equal(got, want) {
		t.Errorf("selected %v, want %v", got, want)
	}
	var unsupported []string
	for _, u := range sel.Unsupported {
		unsupported = append(unsupported, u.Domain.Name)
		switch u.Domain.Name {
		case "zvm":
			if !strings.Contains(u.Reason, "/dev/zvol/DATA/libvirt/zvm-disk") || !strings.Contains(u.Reason, "not supported") {
				t.Errorf("zvm reason: %s", u.Reason)
			}
		case "mixed":
			if !strings.Contains(u.Reason, "vdb") || !strings.Contains(u.Reason, "its file disks are") {
				t.Errorf("mixed reason: %s", u.Reason)
			}
		case "lostvol":
			if !strings.Contains(u.Reason, "nopool") {
				t.Errorf("lostvol reason: %s", u.Reason)
			}
		}
	}
	if want := []string{"lostvol", "mixed", "zvm"}; !slices.Equal(unsupported, want) {
		t.Errorf("unsupported %v, want %v", unsupported, want)
	}

	// The prefix trap the other way round: /data/lib is not /data/libvirt.
	sel, err = c.DomainsUnder(ctxT(t), Dataset{Name: "DATA/lib", Mountpoint: lib}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := sel.Names(); !slices.Equal(got, []string{"libonly"}) {
		t.Errorf("under %s: %v", lib, got)
	}

	// By name.
	sel, err = c.DomainsUnder(ctxT(t), ds, []string{"web01", "netvm", "web01"})
	if err != nil {
		t.Fatal(err)
	}
	if got := sel.Names(); !slices.Equal(got, []string{"web01", "netvm"}) {
		t.Errorf("by name: %v", got)
	}
	if len(sel.Warnings) != 1 || !strings.Contains(sel.Warnings[0], "netvm") {
		t.Errorf("warnings %q", sel.Warnings)
	}
	_, err = c.DomainsUnder(ctxT(t), ds, []string{"web01", "wbe01", "ghost"})
	var nf *NotFoundError
	if !errors.As(err, &nf) || !slices.Equal(nf.Names, []string{"wbe01", "ghost"}) ||
		!strings.Contains(err.Error(), `"wbe01", "ghost"`) || !strings.Contains(err.Error(), "web01") {
		t.Errorf("unknown names: %v", err)
	}
	if _, err := c.DomainsUnder(ctxT(t), Dataset{Mountpoint: "relative/path"}, nil); err == nil {
		t.Error("relative mountpoint accepted")
	}
}

// modeVMs defines three running VMs and one shut-off VM with disks under a
// fresh mountpoint.
func modeVMs(t *testing.T) (*Conn, string, []Domain) {
	t.Helper()
	mnt := filepath.Join(t.TempDir(), "libvirt")
	c := dial(t,
		fileVM("a", "", filepath.Join(mnt, "a.qcow2")),
		fileVM("b", "", filepath.Join(mnt, "b.qcow2")),
		fileVM("c", "", filepath.Join(mnt, "c.qcow2")),
		fileVM("off", testenv.VMShutoff, filepath.Join(mnt, "off.qcow2")),
	)
	sel, err := c.DomainsUnder(ctxT(t), Dataset{Name: "pool/libvirt", Mountpoint: mnt}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := sel.Names(); !slices.Equal(got, []string{"a", "b", "c", "off"}) {
		t.Fatalf("selected %v", got)
	}
	return c, mnt, sel.Domains
}

// recorder is an OnStopping that records names, like a state file.
type recorder struct{ names []string }

func (r *recorder) onStopping(vm string) error {
	r.names = append(r.names, vm)
	return nil
}

// frozen reports whether the test driver has the guest's filesystems
// frozen: freezing again freezes nothing then. A thawed guest is left
// thawed.
func frozen(t *testing.T, c *Conn, name string) bool {
	t.Helper()
	d := domainState(t, c, name)
	n, err := c.Client().DomainFsfreeze(d.ref, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	if n == 0 {
		return true
	}
	if _, err := c.Client().DomainFsthaw(d.ref, nil, 0); err != nil {
		t.Fatal(err)
	}
	return false
}

func TestQuiesceAndResumeEveryMode(t *testing.T) {
	for _, mode := range Modes {
		t.Run(string(mode), func(t *testing.T) {
			c, mnt, doms := modeVMs(t)
			rec := &recorder{}
			q := &Quiescer{Conn: c, Mode: mode, Mountpoint: mnt, SaveTimeout: time.Minute, ResumeTimeout: time.Minute, OnStopping: rec.onStopping}
			qd, err := q.Quiesce(ctxT(t), doms)
			if err != nil {
				t.Fatal(err)
			}
			running := []string{"a", "b", "c"}
			if mode == ModeNone {
				if len(qd.VMs()) != 0 || len(rec.names) != 0 {
					t.Fatalf("mode none touched %v (recorded %v)", qd.Names(), rec.names)
				}
			} else {
				slices.Sort(rec.names)
				if !slices.Equal(rec.names, running) {
					t.Errorf("OnStopping for %v, want %v", rec.names, running)
				}
				if got := qd.Names(); !slices.Equal(got, running) {
					t.Errorf("quiesced %v, want %v", got, running)
				}
				if sk := qd.Skipped(); len(sk) != 1 || sk[0].Name != "off" || sk[0].State != StateShutoff {
					t.Errorf("skipped %+v", sk)
				}
				for _, v := range qd.VMs() {
					if v.Pending || v.Err != nil || v.Took <= 0 {
						t.Errorf("%s: %+v", v.Name, v)
					}
				}
			}

			for _, name := range running {
				d := domainState(t, c, name)
				switch mode {
				case ModeManagedSave:
					if d.State != StateShutoff || !d.ManagedSave {
						t.Errorf("%s: %v managedsave=%v", name, d.State, d.ManagedSave)
					}
				case ModeSave:
					if d.State != StateShutoff || d.ManagedSave {
						t.Errorf("%s: %v managedsave=%v", name, d.State, d.ManagedSave)
					}
					fi, err := os.Stat(SaveFile(mnt, name))
					if err != nil || fi.Size() == 0 {
						t.Errorf("%s: save file: %v", name, err)
					}
				case ModeSuspend:
					if d.State != StatePaused {
						t.Errorf("%s: %v", name, d.State)
					}
				case ModeFSFreeze:
					if d.State != StateRunning || !frozen(t, c, name) {
						t.Errorf("%s: %v, not frozen", name, d.State)
					}
				case ModeNone:
					if d.State != StateRunning {
						t.Errorf("%s: %v", name, d.State)
					}
				}
			}
			if mode == ModeSave {
				fi, err := os.Stat(filepath.Join(mnt, SaveDirName))
				if err != nil || fi.Mode().Perm() != 0o700 {
					t.Errorf("save dir: %v %v", fi.Mode(), err)
				}
				if got := qd.VMs()[0].SaveFile; got != filepath.Join(mnt, ".vmhistory", "a.save") {
					t.Errorf("save file %s", got)
				}
			}
			if d := domainState(t, c, "off"); d.State != StateShutoff || d.ManagedSave {
				t.Errorf("off touched: %v managedsave=%v", d.State, d.ManagedSave)
			}

			rep := qd.Resume(context.Background())
			if err := rep.Err(); err != nil {
				t.Fatal(err)
			}
			if mode == ModeNone {
				if len(rep.VMs) != 0 {
					t.Errorf("mode none resumed %+v", rep.VMs)
				}
			} else if len(rep.VMs) != 3 {
				t.Fatalf("resumed %+v", rep.VMs)
			}
			for _, r := range rep.VMs {
				if !r.Resumed || r.Downtime <= 0 || r.Action == "" {
					t.Errorf("%s: %+v", r.Name, r)
				}
				t.Logf("%s: %s after %v", r.Name, r.Action, r.Downtime)
			}
			for _, name := range running {
				d := domainState(t, c, name)
				if d.State != StateRunning || d.ManagedSave {
					t.Errorf("%s after resume: %v managedsave=%v", name, d.State, d.ManagedSave)
				}
				if mode == ModeFSFreeze && frozen(t, c, name) {
					t.Errorf("%s still frozen", name)
				}
				if _, err := os.Stat(SaveFile(mnt, name)); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("%s: save file left on the live dataset: %v", name, err)
				}
			}
			if d := domainState(t, c, "off"); d.State != StateShutoff {
				t.Errorf("off started: %v", d.State)
			}

			// Resume again is harmless.
			rep = qd.Resume(context.Background())
			if err := rep.Err(); err != nil {
				t.Fatal(err)
			}
			for _, r := range rep.VMs {
				if mode != ModeFSFreeze && r.Resumed {
					t.Errorf("second resume: %+v", r)
				}
			}
		})
	}
}

// faultyOps wraps the real client: it can delay a call (the test driver
// answers at once) or fail it without making it.
type faultyOps struct {
	ops
	delay map[string]time.Duration // "Op/vm"
	fail  map[string]error
}

func faulty(delay map[string]time.Duration, fail map[string]error) func(ops) ops {
	return func(o ops) ops { return &faultyOps{ops: o, delay: delay, fail: fail} }
}

func (f *faultyOps) before(op, vm string) error {
	key := op + "/" + vm
	if d := f.delay[key]; d > 0 {
		time.Sleep(d)
	}
	return f.fail[key]
}

func (f *faultyOps) DomainManagedSave(d libvirt.Domain, flags uint32) error {
	if err := f.before("ManagedSave", d.Name); err != nil {
		return err
	}
	return f.ops.DomainManagedSave(d, flags)
}

func (f *faultyOps) DomainSave(d libvirt.Domain, to string) error {
	if err := f.before("Save", d.Name); err != nil {
		return err
	}
	return f.ops.DomainSave(d, to)
}

func (f *faultyOps) DomainSuspend(d libvirt.Domain) error {
	if err := f.before("Suspend", d.Name); err != nil {
		return err
	}
	return f.ops.DomainSuspend(d)
}

func (f *faultyOps) DomainCreate(d libvirt.Domain) error {
	if err := f.before("Create", d.Name); err != nil {
		return err
	}
	return f.ops.DomainCreate(d)
}

func (f *faultyOps) DomainRestore(from string) error {
	if err := f.before("Restore", strings.TrimSuffix(filepath.Base(from), ".save")); err != nil {
		return err
	}
	return f.ops.DomainRestore(from)
}

func resultFor(t *testing.T, rep ResumeReport, name string) VMResult {
	t.Helper()
	for _, r := range rep.VMs {
		if r.Name == name {
			return r
		}
	}
	t.Fatalf("no result for %s in %+v", name, rep.VMs)
	return VMResult{}
}

func TestQuiescePartialFailure(t *testing.T) {
	t.Run("undefined after listing", func(t *testing.T) {
		c, mnt, doms := modeVMs(t)
		b := domainState(t, c, "b")
		if err := c.Client().DomainDestroy(b.ref); err != nil {
			t.Fatal(err)
		}
		if err := c.Client().DomainUndefine(b.ref); err != nil {
			t.Fatal(err)
		}
		q := &Quiescer{Conn: c, Mode: ModeManagedSave, Mountpoint: mnt}
		qd, err := q.Quiesce(ctxT(t), doms)
		if err == nil || !strings.Contains(err.Error(), "managedsave b: ") || !strings.Contains(err.Error(), "no longer exists") {
			t.Fatalf("Quiesce error: %v", err)
		}
		if got := qd.Names(); !slices.Equal(got, []string{"a", "c"}) {
			t.Fatalf("quiesced %v", got)
		}
		rep := qd.Resume(context.Background())
		if err := rep.Err(); err != nil {
			t.Fatal(err)
		}
		for _, name := range []string{"a", "c"} {
			if d := domainState(t, c, name); d.State != StateRunning {
				t.Errorf("%s: %v", name, d.State)
			}
		}
	})

	t.Run("OnStopping fails for one", func(t *testing.T) {
		c, mnt, doms := modeVMs(t)
		rec := &recorder{}
		q := &Quiescer{Conn: c, Mode: ModeSave, Mountpoint: mnt, OnStopping: func(vm string) error {
			if vm == "b" {
				return errors.New("state file: disk full")
			}
			return rec.onStopping(vm)
		}}
		qd, err := q.Quiesce(ctxT(t), doms)
		if err == nil || !strings.Contains(err.Error(), "save b: ") || !strings.Contains(err.Error(), "disk full") {
			t.Fatalf("Quiesce error: %v", err)
		}
		if d := domainState(t, c, "b"); d.State != StateRunning {
			t.Errorf("b was stopped without being recorded: %v", d.State)
		}
		if got := qd.Names(); !slices.Equal(got, []string{"a", "c"}) {
			t.Fatalf("quiesced %v", got)
		}
		for _, name := range []string{"a", "c"} {
			if d := domainState(t, c, name); d.State != StateShutoff {
				t.Errorf("%s not saved: %v", name, d.State)
			}
		}
		rep := qd.Resume(context.Background())
		if err := rep.Err(); err != nil {
			t.Fatal(err)
		}
		if len(rep.VMs) != 2 {
			t.Fatalf("resumed %+v", rep.VMs)
		}
		for _, name := range []string{"a", "b", "c"} {
			if d := domainState(t, c, name); d.State != StateRunning {
				t.Errorf("%s: %v", name, d.State)
			}
		}
		if d := domainState(t, c, "off"); d.State != StateShutoff {
			t.Errorf("off: %v", d.State)
		}
	})

	t.Run("quiesce call fails for one", func(t *testing.T) {
		c, mnt, doms := modeVMs(t)
		c.wrap = faulty(nil, map[string]error{"ManagedSave/b": errors.New("injected: qemu refused")})
		q := &Quiescer{Conn: c, Mode: ModeManagedSave, Mountpoint: mnt}
		qd, err := q.Quiesce(ctxT(t), doms)
		if err == nil || !strings.Contains(err.Error(), "managedsave b: injected: qemu refused") {
			t.Fatalf("Quiesce error: %v", err)
		}
		for _, v := range qd.VMs() {
			if (v.Err != nil) != (v.Name == "b") {
				t.Errorf("%s: %+v", v.Name, v)
			}
		}
		rep := qd.Resume(context.Background())
		if err := rep.Err(); err != nil {
			t.Fatal(err)
		}
		if r := resultFor(t, rep, "b"); r.Resumed || r.Downtime != 0 || r.Action != "already running" {
			t.Errorf("b: %+v", r)
		}
		for _, name := range []string{"a", "c"} {
			if r := resultFor(t, rep, name); !r.Resumed || r.Action != "started from its managed-save image" {
				t.Errorf("%s: %+v", name, r)
			}
		}
		for _, name := range []string{"a", "b", "c"} {
			if d := domainState(t, c, name); d.State != StateRunning {
				t.Errorf("%s: %v", name, d.State)
			}
		}
	})

	t.Run("resume fails for one and continues", func(t *testing.T) {
		c, mnt, doms := modeVMs(t)
		c.wrap = faulty(nil, map[string]error{"Restore/a": errors.New("injected: image corrupt")})
		q := &Quiescer{Conn: c, Mode: ModeSave, Mountpoint: mnt}
		qd, err := q.Quiesce(ctxT(t), doms)
		if err != nil {
			t.Fatal(err)
		}
		rep := qd.Resume(context.Background())
		err = rep.Err()
		if err == nil || !strings.Contains(err.Error(), "restore a: ") || !strings.Contains(err.Error(), "image corrupt") {
			t.Fatalf("Resume error: %v", err)
		}
		if r := resultFor(t, rep, "a"); r.Resumed || r.Err == nil {
			t.Errorf("a: %+v", r)
		}
		// The state file of the VM that could not be restored is kept.
		if _, err := os.Stat(SaveFile(mnt, "a")); err != nil {
			t.Errorf("a's state file: %v", err)
		}
		for _, name := range []string{"b", "c"} {
			if d := domainState(t, c, name); d.State != StateRunning {
				t.Errorf("%s: %v", name, d.State)
			}
		}
	})
}

func TestRecover(t *testing.T) {
	mnt := filepath.Join(t.TempDir(), "libvirt")
	c := dial(t,
		fileVM("a", "", filepath.Join(mnt, "a.qcow2")),
		fileVM("b", "", filepath.Join(mnt, "b.qcow2")),
		fileVM("c", "", filepath.Join(mnt, "c.qcow2")),
		fileVM("admin-stopped", testenv.VMShutoff, filepath.Join(mnt, "admin.qcow2")),
	)
	sel, err := c.DomainsUnder(ctxT(t), Dataset{Mountpoint: mnt}, []string{"a", "b", "c"})
	if err != nil {
		t.Fatal(err)
	}
	// A run that stops a, b and c, records them, and dies.
	rec := &recorder{}
	q := &Quiescer{Conn: c, Mode: ModeManagedSave, Mountpoint: mnt, OnStopping: rec.onStopping}
	if _, err := q.Quiesce(ctxT(t), sel.Domains); err != nil {
		t.Fatal(err)
	}
	// Meanwhile the admin started c again by hand.
	if err := c.Client().DomainCreate(domainState(t, c, "c").ref); err != nil {
		t.Fatal(err)
	}

	recorded := append(rec.names, "gone")
	rep := q.Recover(context.Background(), recorded)
	for _, name := range []string{"a", "b"} {
		if r := resultFor(t, rep, name); !r.Resumed || r.Err != nil || r.Action != "started from its managed-save image" {
			t.Errorf("%s: %+v", name, r)
		}
	}
	if r := resultFor(t, rep, "c"); r.Resumed || r.Err != nil || r.Action != "already running" {
		t.Errorf("c: %+v", r)
	}
	if r := resultFor(t, rep, "gone"); r.Err == nil || !strings.Contains(r.Err.Error(), "recover gone") {
		t.Errorf("gone: %+v", r)
	}
	if len(rep.VMs) != 4 {
		t.Errorf("report %+v", rep.VMs)
	}
	for _, name := range []string{"a", "b", "c"} {
		if d := domainState(t, c, name); d.State != StateRunning {
			t.Errorf("%s: %v", name, d.State)
		}
	}
	if d := domainState(t, c, "admin-stopped"); d.State != StateShutoff {
		t.Errorf("a VM the admin stopped was started: %v", d.State)
	}

	// Recovering again is a no-op.
	rep = q.Recover(context.Background(), rec.names)
	if err := rep.Err(); err != nil {
		t.Fatal(err)
	}
	for _, r := range rep.VMs {
		if r.Resumed {
			t.Errorf("second recover: %+v", r)
		}
	}
}

func TestRecoverSuspendAndSave(t *testing.T) {
	c, mnt, doms := modeVMs(t)
	// A crashed suspend run left a paused.
	sq := &Quiescer{Conn: c, Mode: ModeSuspend}
	if _, err := sq.Quiesce(ctxT(t), doms[:1]); err != nil {
		t.Fatal(err)
	}
	// A crashed save run left b and c saved into the dataset.
	q := &Quiescer{Conn: c, Mode: ModeSave, Mountpoint: mnt}
	if _, err := q.Quiesce(ctxT(t), doms[1:3]); err != nil {
		t.Fatal(err)
	}
	// Suspend mode never shuts a VM off: "off" is not started even if listed.
	rep := sq.Recover(context.Background(), []string{"a", "off"})
	if r := resultFor(t, rep, "a"); !r.Resumed || r.Action != "resumed" {
		t.Errorf("a: %+v", r)
	}
	if r := resultFor(t, rep, "off"); r.Resumed || r.Err == nil || !strings.Contains(r.Err.Error(), "never shuts a VM off") {
		t.Errorf("off: %+v", r)
	}

	// c's disk was written after it was saved (it ran after the crash,
	// then was shut down): its state file is stale and must not be
	// restored.
	later := time.Now().Add(time.Hour)
	if err := os.Chtimes(filepath.Join(mnt, "c.qcow2"), later, later); err != nil {
		t.Fatal(err)
	}
	rep = q.Recover(context.Background(), []string{"b", "c"})
	if r := resultFor(t, rep, "b"); !r.Resumed || r.Err != nil || !strings.HasPrefix(r.Action, "restored from ") {
		t.Errorf("b: %+v", r)
	}
	if _, err := os.Stat(SaveFile(mnt, "b")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("b's state file left: %v", err)
	}
	if r := resultFor(t, rep, "c"); r.Resumed || r.Err == nil || !strings.Contains(r.Err.Error(), "written after the state file") {
		t.Errorf("c: %+v", r)
	}
	if d := domainState(t, c, "c"); d.State != StateShutoff {
		t.Errorf("c: %v", d.State)
	}
	if _, err := os.Stat(SaveFile(mnt, "c")); err != nil {
		t.Errorf("c's state file: %v", err)
	}
	for _, name := range []string{"a", "b"} {
		if d := domainState(t, c, name); d.State != StateRunning {
			t.Errorf("%s: %v", name, d.State)
		}
	}
	if d := domainState(t, c, "off"); d.State != StateShutoff {
		t.Errorf("off: %v", d.State)
	}
}

func TestTimeouts(t *testing.T) {
	c, mnt, doms := modeVMs(t)
	c.wrap = faulty(map[string]time.Duration{
		"ManagedSave/b": 1500 * time.Millisecond,
		"Create/c":      1500 * time.Millisecond,
	}, nil)
	q := &Quiescer{Conn: c, Mode: ModeManagedSave, Mountpoint: mnt,
		SaveTimeout: 300 * time.Millisecond, ResumeTimeout: 3 * time.Second}
	start := time.Now()
	qd, err := q.Quiesce(ctxT(t), doms)
	took := time.Since(start)
	if err == nil || !strings.Contains(err.Error(), "managedsave b: ") || !strings.Contains(err.Error(), "save_timeout") {
		t.Fatalf("Quiesce error: %v", err)
	}
	if took > time.Second {
		t.Errorf("Quiesce took %v despite a 300ms save timeout", took)
	}
	var pending []string
	for _, v := range qd.VMs() {
		if v.Pending {
			pending = append(pending, v.Name)
		}
	}
	if !slices.Equal(pending, []string{"b"}) {
		t.Errorf("pending %v", pending)
	}

	// Resume waits for b's save to end, then starts it; c's start is
	// slow but within the resume timeout.
	rep := qd.Resume(context.Background())
	if err := rep.Err(); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"a", "b", "c"} {
		r := resultFor(t, rep, name)
		if !r.Resumed {
			t.Errorf("%s: %+v", name, r)
		}
		if d := domainState(t, c, name); d.State != StateRunning {
			t.Errorf("%s: %v", name, d.State)
		}
	}
	if r := resultFor(t, rep, "b"); r.Downtime < 1500*time.Millisecond {
		t.Errorf("b's downtime %v does not include its slow save", r.Downtime)
	}

	// A resume that overruns its timeout is reported, and the next
	// Resume (or Recover) finds the VM running once libvirt is done.
	q.ResumeTimeout = 300 * time.Millisecond
	qd, err = q.Quiesce(ctxT(t), doms[2:3]) // c
	if err != nil {
		t.Fatal(err)
	}
	rep = qd.Resume(context.Background())
	if err := rep.Err(); err == nil || !strings.Contains(err.Error(), "start c: ") || !strings.Contains(err.Error(), "resume_timeout") {
		t.Fatalf("Resume error: %v", err)
	}
	time.Sleep(1500 * time.Millisecond)
	rep = qd.Resume(context.Background())
	if r := resultFor(t, rep, "c"); r.Err != nil || r.Action != "already running" {
		t.Errorf("c: %+v", r)
	}
}

func TestQuiesceRunsInParallel(t *testing.T) {
	c, mnt, doms := modeVMs(t)
	const d = 400 * time.Millisecond
	c.wrap = faulty(map[string]time.Duration{"Suspend/a": d, "Suspend/b": d, "Suspend/c": d}, nil)

	q := &Quiescer{Conn: c, Mode: ModeSuspend, Mountpoint: mnt}
	start := time.Now()
	qd, err := q.Quiesce(ctxT(t), doms)
	if err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 2*d {
		t.Errorf("3 VMs took %v with %v each: not in parallel", took, d)
	}
	if err := qd.Resume(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}

	q.Parallel = 1
	start = time.Now()
	qd, err = q.Quiesce(ctxT(t), doms)
	if err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took < 3*d {
		t.Errorf("Parallel=1 took %v, less than 3×%v", took, d)
	}
	if err := qd.Resume(context.Background()).Err(); err != nil {
		t.Fatal(err)
	}
}

func TestQuiesceInterrupted(t *testing.T) {
	c, mnt, doms := modeVMs(t)
	c.wrap = faulty(map[string]time.Duration{"Save/a": time.Second}, nil)
	q := &Quiescer{Conn: c, Mode: ModeSave, Mountpoint: mnt, Parallel: 1}

	// SIGTERM while a's save is under way: Quiesce returns at once, b and c
	// are not touched, a is handed back and resumed with a fresh context.
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(200*time.Millisecond, cancel)
	start := time.Now()
	qd, err := q.Quiesce(ctx, doms)
	if took := time.Since(start); took > 800*time.Millisecond {
		t.Errorf("Quiesce took %v after cancel", took)
	}
	if err == nil || !strings.Contains(err.Error(), "save a: interrupted") || !strings.Contains(err.Error(), "save b: not quiesced") {
		t.Fatalf("Quiesce error: %v", err)
	}
	if got := qd.Names(); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("quiesced %v", got)
	}
	for _, name := range []string{"b", "c"} {
		if d := domainState(t, c, name); d.State != StateRunning {
			t.Errorf("%s: %v", name, d.State)
		}
	}
	rep := qd.Resume(context.Background())
	if err := rep.Err(); err != nil {
		t.Fatal(err)
	}
	if r := resultFor(t, rep, "a"); !r.Resumed || !strings.HasPrefix(r.Action, "restored from") {
		t.Errorf("a: %+v", r)
	}
	if d := domainState(t, c, "a"); d.State != StateRunning {
		t.Errorf("a: %v", d.State)
	}
	if _, err := os.Stat(SaveFile(mnt, "a")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a's state file left: %v", err)
	}
}

func TestNodeXML(t *testing.T) {
	testenv.RequireLibvirt(t)
	dir := t.TempDir()
	uri := testenv.WriteTestNodeXML(t, dir,
		fileVM("n1", "", filepath.Join(dir, "disks", "n1.img")),
		fileVM("n2", testenv.VMShutoff, filepath.Join(dir, "disks", "n2.img")),
	)
	c, err := Dial(ctxT(t), testenv.LibvirtSocket, uri)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sel, err := c.DomainsUnder(ctxT(t), Dataset{Mountpoint: dir}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := names(sel.Domains); !slices.Equal(got, []string{"n1", "n2"}) {
		t.Fatalf("domains %v", got)
	}
	if sel.Domains[0].State != StateRunning || sel.Domains[1].State != StateShutoff {
		t.Errorf("states %v %v", sel.Domains[0].State, sel.Domains[1].State)
	}
	if _, err := os.Stat(filepath.Join(dir, "disks", "n1.img")); err != nil {
		t.Error(err)
	}
}

func TestResumeReconnects(t *testing.T) {
	testenv.RequireLibvirt(t)
	dir := t.TempDir()
	// A node file, so that a new connection sees the same VMs (as with
	// qemu:///system), not the test driver's default state.
	uri := testenv.WriteTestNodeXML(t, dir,
		fileVM("a", "", filepath.Join(dir, "a.img")),
		fileVM("b", "", filepath.Join(dir, "b.img")),
	)
	c, err := Dial(ctxT(t), testenv.LibvirtSocket, uri)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	sel, err := c.DomainsUnder(ctxT(t), Dataset{Mountpoint: dir}, nil)
	if err != nil {
		t.Fatal(err)
	}
	q := &Quiescer{Conn: c, Mode: ModeManagedSave}
	qd, err := q.Quiesce(ctxT(t), sel.Domains)
	if err != nil {
		t.Fatal(err)
	}
	// The connection breaks (libvirtd restarted by a package upgrade).
	old := c.Client()
	if err := old.Disconnect(); err != nil {
		t.Fatal(err)
	}
	rep := qd.Resume(context.Background())
	if err := rep.Err(); err != nil {
		t.Fatal(err)
	}
	if c.Client() == old || c.lost() {
		t.Fatal("no new connection")
	}
	// The test driver's fresh state has both running, as the node file says.
	for _, name := range []string{"a", "b"} {
		if r := resultFor(t, rep, name); r.Action != "already running" {
			t.Errorf("%s: %+v", name, r)
		}
	}
}

// The save directory another user owns is refused: libvirtd writes the
// state files in there as root.
func TestMakeSaveDirRefusesForeignOwner(t *testing.T) {
	mnt := t.TempDir()
	if err := makeSaveDir(mnt); err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(mnt, SaveDirName)
	if err := os.Chown(dir, 1000, 1000); err != nil {
		t.Fatal(err)
	}
	if err := makeSaveDir(mnt); err == nil || !strings.Contains(err.Error(), "owned by uid 1000") {
		t.Errorf("save directory owned by another user: %v, want a refusal", err)
	}
	os.Remove(dir)
	if err := os.Symlink(t.TempDir(), dir); err != nil {
		t.Fatal(err)
	}
	if err := makeSaveDir(mnt); err == nil || !strings.Contains(err.Error(), "not a directory") {
		t.Errorf("save directory a symlink: %v, want a refusal", err)
	}
}
