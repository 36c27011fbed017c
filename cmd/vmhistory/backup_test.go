package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"

	"github.com/vmhistory/vmhistory/backup"
	"github.com/vmhistory/vmhistory/kopiarepo"
	"github.com/vmhistory/vmhistory/testenv"
)

// packGate is a reverse proxy in front of a WebDAV server that, while
// armed, holds every upload (or download) of a kopia pack blob (a path
// under the repository's directory /kopia/ starting with "p") until
// released, and says when the first one arrived: a deterministic point
// inside a backup's upload step or a restore's copy. Held requests are
// then answered 503, and so is every later one if the gate was released
// with fail.
type packGate struct {
	proxy   *httputil.ReverseProxy
	mu      sync.Mutex
	method  string // what an armed gate holds: PUT (uploads) or GET
	armed   bool
	failing bool
	delay   time.Duration // added to every pack request of the gate's method while not armed
	held    chan struct{} // closed at the first held upload
	once    sync.Once
	open    chan struct{} // closed by release
}

func newPackGate(t *testing.T, target string) (*packGate, string) {
	t.Helper()
	u, err := url.Parse(target)
	if err != nil {
		t.Fatal(err)
	}
	g := &packGate{proxy: httputil.NewSingleHostReverseProxy(u), held: make(chan struct{}), open: make(chan struct{})}
	srv := &http.Server{Handler: g}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	t.Cleanup(func() { g.release(false); srv.Close() })
	return g, "http://" + ln.Addr().String() + "/"
}

// arm holds the uploads (PUT), or with GET the downloads, of packs.
func (g *packGate) arm(method ...string) {
	g.mu.Lock()
	g.armed, g.method = true, http.MethodPut
	if len(method) > 0 {
		g.method = method[0]
	}
	g.mu.Unlock()
}

// slow delays every pack request of method (PUT or GET) by d, or with 0
// no longer, while the gate is not armed.
func (g *packGate) slow(method string, d time.Duration) {
	g.mu.Lock()
	g.method, g.delay = method, d
	g.mu.Unlock()
}

// release answers the held uploads 503 and lets later ones through, or,
// with fail, answers them 503 too.
func (g *packGate) release(fail bool) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.armed {
		g.armed, g.failing = false, fail
		close(g.open)
	}
}

// heal lets every request through again after a release with fail.
func (g *packGate) heal() {
	g.mu.Lock()
	g.failing = false
	g.mu.Unlock()
}

func (g *packGate) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	blob, _, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/kopia/"), "/")
	g.mu.Lock()
	armed, failing, method, delay := g.armed, g.failing, g.method, g.delay
	g.mu.Unlock()
	if r.Method != method || !strings.HasPrefix(blob, "p") {
		g.proxy.ServeHTTP(w, r)
		return
	}
	if !armed && delay > 0 {
		time.Sleep(delay)
	}
	if armed {
		g.once.Do(func() { close(g.held) })
		select {
		case <-g.open:
		case <-r.Context().Done(): // the client died
		}
		failing = true
	}
	if failing {
		http.Error(w, "failed by the test", http.StatusServiceUnavailable)
		return
	}
	g.proxy.ServeHTTP(w, r)
}

// backupSandbox is a dataset with a file, a kopia repository on WebDAV
// behind a packGate, and a configuration for `vmhistory backup` with
// keep_local 1, no replica and quiesce mode none.
type backupSandbox struct {
	pool    *testenv.Pool
	dataset string
	mnt     string
	config  string
	gate    *packGate
}

func newBackupSandbox(t *testing.T) *backupSandbox {
	t.Helper()
	ctx := context.Background()
	sb := &backupSandbox{pool: testenv.NewPool(t, 256)}
	sb.dataset, sb.mnt = sb.pool.Dataset(t, "libvirt")
	dav := testenv.StartWebDAV(t)
	var davURL string
	sb.gate, davURL = newPackGate(t, dav.URL)
	dir := t.TempDir()
	pwFile := filepath.Join(dir, "password")
	const password = "correct horse battery staple"
	if err := os.WriteFile(pwFile, []byte(password+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	kopiaConfig := filepath.Join(dir, "kopia.config")
	spec := kopiarepo.WebDAV{URL: davURL + "kopia/", Username: dav.Username, Password: dav.Password}
	if err := kopiarepo.Create(ctx, spec, kopiaConfig, password, kopiarepo.CreateOptions{
		ConnectOptions: kopiarepo.ConnectOptions{Host: "kvmhost", User: "root", CacheDirectory: filepath.Join(dir, "cache")}}); err != nil {
		t.Fatal(err)
	}
	sb.config = filepath.Join(dir, "config.yaml")
	cfg := fmt.Sprintf(`datasets: [%s]
keep_local: 1
quiesce: {mode: none}
state_dir: %s
kopia: {config_file: %s, password_file: %s, host: kvmhost, user: root}
`, sb.dataset, filepath.Join(dir, "state"), kopiaConfig, pwFile)
	if err := os.WriteFile(sb.config, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	return sb
}

// write changes the dataset's file, as a VM does between nights, and
// returns what it wrote.
func (sb *backupSandbox) write(t *testing.T, night int) []byte {
	t.Helper()
	if err := os.MkdirAll(filepath.Join(sb.mnt, "images"), 0o755); err != nil {
		t.Fatal(err)
	}
	data := []byte(strings.Repeat(fmt.Sprintf("night %d ", night), 100000+night))
	if err := os.WriteFile(filepath.Join(sb.mnt, "images", "vm.img"), data, 0o644); err != nil {
		t.Fatal(err)
	}
	return data
}

// snapshots lists the dataset's snapshot names.
func (sb *backupSandbox) snapshots(t *testing.T) []string {
	t.Helper()
	snaps, err := sb.pool.ZFS.Snapshots(context.Background(), sb.dataset)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range snaps {
		names = append(names, s.Name)
	}
	return names
}

// backupReport parses the report of `vmhistory backup --json`: the first
// line that is "{" starts it (logs share the output).
func backupReport(t *testing.T, out string) backup.Report {
	t.Helper()
	i := strings.Index(out, "\n{\n")
	if !strings.HasPrefix(out, "{\n") && i < 0 {
		t.Fatalf("no JSON report in the output:\n%s", out)
	}
	var rep backup.Report
	if err := json.NewDecoder(strings.NewReader(out[i+1:])).Decode(&rep); err != nil {
		t.Fatalf("JSON report: %v; output:\n%s", err, out)
	}
	return rep
}

// nextSecond waits for the next wall-clock second, so that the next
// backup's snapshot name (to the second) differs from the last one's.
func nextSecond() {
	time.Sleep(time.Until(time.Now().Truncate(time.Second).Add(time.Second)))
}

func stepOf(rep backup.Report, step string) (backup.StepResult, bool) {
	for _, s := range rep.Steps {
		if s.Step == step {
			return s, true
		}
	}
	return backup.StepResult{}, false
}

// A backup killed (kill -9) in the middle of its upload leaves the
// read-only clone it was uploading from. The next backup's recover step
// removes it, so that its prune can destroy the snapshot: before, the
// clone of the dead process kept the snapshot "in use" every night.
func TestBackupKilledDuringUploadIsSweptNextNight(t *testing.T) {
	sb := newBackupSandbox(t)
	sb.write(t, 1)
	sb.gate.arm()
	killed := startVMHistory(t, "backup", "--config", sb.config)
	select {
	case <-sb.gate.held:
	case <-killed.done:
		t.Fatalf("backup ended (%v) before uploading a pack; output:\n%s", killed.err, killed.output)
	case <-time.After(2 * time.Minute):
		t.Fatalf("backup did not upload a pack within 2 minutes; output:\n%s", killed.output)
	}
	first := sb.snapshots(t)
	if len(first) != 1 {
		t.Fatalf("snapshots while the first backup uploads: %v", first)
	}
	firstSnap := sb.dataset + "@" + first[0]
	if cl := clones(t, firstSnap); len(cl) != 1 {
		t.Fatalf("clones while the first backup uploads: %v, want its one clone", cl)
	}
	if err := killed.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed.wait(t, 30*time.Second)
	sb.gate.release(false)
	leaked := clones(t, firstSnap)
	if len(leaked) != 1 {
		t.Fatalf("clones after kill -9: %v, want the killed backup's", leaked)
	}

	// The next night: a new snapshot is taken, both are uploaded, and the
	// first one is beyond keep_local 1.
	nextSecond()
	sb.write(t, 2)
	next := startVMHistory(t, "backup", "--config", sb.config, "--json")
	if err := next.wait(t, 5*time.Minute); err != nil {
		t.Fatalf("the next backup: %v; output:\n%s", err, next.output)
	}
	rep := backupReport(t, next.output.String())
	rec, ok := stepOf(rep, backup.StepRecover)
	if !ok || !strings.Contains(rec.Detail, leaked[0]) {
		t.Errorf("recover step %+v does not name the swept clone %s", rec, leaked[0])
	}
	if cl := clones(t, firstSnap); len(cl) > 0 {
		t.Errorf("clones left after the next backup: %v", cl)
	}
	pr, _ := stepOf(rep, backup.StepPrune)
	if pr.Status != backup.StatusOK || !strings.Contains(pr.Detail, "destroyed: "+first[0]) {
		t.Errorf("prune step %+v, want ok and %s destroyed", pr, first[0])
	}
	if got := sb.snapshots(t); len(got) != 1 || got[0] == first[0] {
		t.Errorf("snapshots after the next backup: %v, want only the new one", got)
	}
	t.Logf("killed:\n%s\nnext:\n%s", killed.output, next.output)
}

// sharedTestVMs defines running VMs with disks under mnt on
// test:///default, whose state every connection open at once shares (a
// node file would give the child process its own), under names no other
// test uses; they are undefined when the test ends. It returns the
// connection that keeps the state alive and the VMs' names.
func sharedTestVMs(t *testing.T, mnt string, n int) (*libvirt.Libvirt, []string) {
	t.Helper()
	l := testenv.DialLibvirt(t, testenv.TestDriverURI)
	var vms []testenv.TestVM
	var names []string
	for i := range n {
		name := fmt.Sprintf("vmht-%d-%s-%d", os.Getpid(), strings.ToLower(strings.ReplaceAll(t.Name(), "/", "-")), i)
		names = append(names, name)
		vms = append(vms, testenv.TestVM{Name: name, Disks: []testenv.TestDisk{{Path: filepath.Join(mnt, "images", name+".qcow2")}}})
	}
	testenv.DefineTestVMs(t, l, vms...)
	t.Cleanup(func() {
		for _, name := range names {
			if d, err := l.DomainLookupByName(name); err == nil {
				l.DomainDestroy(d)
				l.DomainManagedSaveRemove(d, 0)
				l.DomainUndefine(d)
			}
		}
	})
	return l, names
}

func vmState(t *testing.T, l *libvirt.Libvirt, name string) libvirt.DomainState {
	t.Helper()
	d, err := l.DomainLookupByName(name)
	if err != nil {
		t.Fatal(err)
	}
	st, _, err := l.DomainGetState(d, 0)
	if err != nil {
		t.Fatal(err)
	}
	return libvirt.DomainState(st)
}

// quiesceSandbox is a dataset with three running test-driver VMs on it
// (see sharedTestVMs), a LibvirtGate holding the first managedsave, and a
// backup configuration using the gate, with a metrics textfile.
type quiesceSandbox struct {
	pool              *testenv.Pool
	dataset           string
	l                 *libvirt.Libvirt
	vms               []string
	gate              *testenv.LibvirtGate
	stateDir, metrics string
	config            string
}

func newQuiesceSandbox(t *testing.T) *quiesceSandbox {
	t.Helper()
	sb := &quiesceSandbox{pool: testenv.NewPool(t, 128)}
	var mnt string
	sb.dataset, mnt = sb.pool.Dataset(t, "libvirt")
	sb.l, sb.vms = sharedTestVMs(t, mnt, 3)
	sb.gate = testenv.StartLibvirtGate(t, testenv.LibvirtProcDomainManagedSave)
	dir := t.TempDir()
	sb.stateDir = filepath.Join(dir, "state")
	sb.metrics = filepath.Join(dir, "vmhistory.prom")
	sb.config = writeTempConfig(t, fmt.Sprintf(`datasets: [%s]
quiesce: {mode: managedsave, save_timeout: 5m, resume_timeout: 1m}
libvirt: {uri: "%s", socket: %s}
state_dir: %s
metrics: {textfile: %s}
`, sb.dataset, testenv.TestDriverURI, sb.gate.Socket, sb.stateDir, sb.metrics))
	return sb
}

// hangUpDuringQuiesce sends SIGHUP once the child's first managedsave is
// held by the gate, and lets the call through once the child acted on it
// (it asks libvirt to abort the save). before runs just before the signal.
func (sb *quiesceSandbox) hangUpDuringQuiesce(t *testing.T, child *mountChild, before func()) {
	t.Helper()
	select {
	case <-sb.gate.Called(testenv.LibvirtProcDomainManagedSave):
	case <-child.done:
		t.Fatalf("backup ended (%v) before quiescing; output:\n%s", child.err, child.output)
	case <-time.After(2 * time.Minute):
		t.Fatalf("backup did not quiesce within 2 minutes; output:\n%s", child.output)
	}
	before()
	if err := child.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sb.gate.Called(testenv.LibvirtProcDomainAbortJob):
	case <-child.done:
		t.Fatalf("backup ended (%v) on SIGHUP without stopping its managedsave; output:\n%s", child.err, child.output)
	case <-time.After(2 * time.Minute):
		t.Fatalf("backup did not act on SIGHUP within 2 minutes; output:\n%s", child.output)
	}
	sb.gate.Release()
}

// checkAfterHangUp checks what a backup ended by SIGHUP during quiesce
// leaves: exit status 1, the VMs running, no snapshot, failure metrics, no
// stopped-VM record, no clone.
func (sb *quiesceSandbox) checkAfterHangUp(t *testing.T, child *mountChild) {
	t.Helper()
	err := child.wait(t, 3*time.Minute)
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Errorf("backup after SIGHUP: %v, want exit status 1; output:\n%s", err, child.output)
	}
	for _, vm := range sb.vms {
		if st := vmState(t, sb.l, vm); st != libvirt.DomainRunning {
			t.Errorf("VM %s is %v after the backup ended on SIGHUP, want running", vm, st)
		}
	}
	if snaps, err := sb.pool.ZFS.Snapshots(context.Background(), sb.dataset); err != nil || len(snaps) != 0 {
		t.Errorf("snapshots after SIGHUP during quiesce: %v (%v), want none", snaps, err)
	}
	text, err := os.ReadFile(sb.metrics)
	if err != nil || !strings.Contains(string(text), "vmhistory_backup_success 0") {
		t.Errorf("metrics textfile: %v\n%s", err, text)
	}
	if _, err := os.Stat(filepath.Join(sb.stateDir, "stopped-vms.json")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stopped-VM record left: %v", err)
	}
	if cl := clones(t, sb.dataset+"@none"); len(cl) > 0 {
		t.Errorf("clones left: %v", cl)
	}
}

// SIGHUP (an admin's ssh session dropped) during quiesce ends the backup
// as SIGTERM does: the VMs run again, no snapshot is taken, the report and
// the metrics are written, the exit status is 1 and the stopped-VM record
// is cleared. It used to end the process on the spot (status 129), VMs
// stopped. The child's libvirt calls go through a LibvirtGate that holds
// the first managedsave until the child has seen the signal.
func TestBackupSIGHUPDuringQuiesce(t *testing.T) {
	sb := newQuiesceSandbox(t)
	child := startVMHistory(t, "backup", "--config", sb.config, "--json")
	sb.hangUpDuringQuiesce(t, child, func() {})
	sb.checkAfterHangUp(t, child)
	rep := backupReport(t, child.output.String())
	if rep.Success || !strings.Contains(rep.Failure, "hangup") {
		t.Errorf("report: success %v, failure %q; want a failure naming the hangup", rep.Success, rep.Failure)
	}
	resumed := 0
	for _, vm := range rep.VMs {
		if vm.Resumed {
			resumed++
		}
	}
	if resumed == 0 {
		t.Errorf("the report shows no VM resumed: %+v", rep.VMs)
	}
	t.Logf("output:\n%s", child.output)
}

// The same with the session's output gone as well (its reader closed, as
// sshd's is when the connection drops), logging every command (-v): the
// writes fail, and the backup still ends through resume with exit status
// 1, not killed by SIGPIPE.
func TestBackupSIGHUPWithSessionGone(t *testing.T) {
	sb := newQuiesceSandbox(t)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	child := &mountChild{cmd: exec.Command(os.Args[0], "backup", "-v", "--config", sb.config), output: &syncBuffer{}, done: make(chan struct{})}
	child.cmd.Env = append(os.Environ(), runMainEnv+"=1")
	child.cmd.Stdout, child.cmd.Stderr = w, w
	if err := child.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	w.Close()
	go func() { child.err = child.cmd.Wait(); close(child.done) }()
	t.Cleanup(func() {
		select {
		case <-child.done:
		default:
			child.cmd.Process.Kill()
			<-child.done
		}
	})
	sb.hangUpDuringQuiesce(t, child, func() { r.Close() })
	sb.checkAfterHangUp(t, child)
}

// SIGHUP during the upload ends the backup through its clean-up: the
// read-only clone it uploads from is removed, the report says the upload
// was interrupted and the exit status is 1 (it used to be 129, the clone
// left for ever).
func TestBackupSIGHUPDuringUploadLeavesNoClone(t *testing.T) {
	sb := newBackupSandbox(t)
	sb.write(t, 1)
	sb.gate.arm()
	child := startVMHistory(t, "backup", "--config", sb.config, "--json")
	select {
	case <-sb.gate.held:
	case <-child.done:
		t.Fatalf("backup ended (%v) before uploading a pack; output:\n%s", child.err, child.output)
	case <-time.After(2 * time.Minute):
		t.Fatalf("backup did not upload a pack within 2 minutes; output:\n%s", child.output)
	}
	snaps := sb.snapshots(t)
	if len(snaps) != 1 || len(clones(t, sb.dataset+"@"+snaps[0])) != 1 {
		t.Fatalf("while uploading: snapshots %v, want one with its clone", snaps)
	}
	if err := child.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	// kopia's WebDAV requests do not follow its context: the held one
	// must be answered for the upload to see the interruption. Every
	// pack upload fails from now on, so that the upload cannot succeed
	// before the child acts on the signal.
	sb.gate.release(true)
	err := child.wait(t, 3*time.Minute)
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 1 {
		t.Errorf("backup after SIGHUP: %v, want exit status 1; output:\n%s", err, child.output)
	}
	if cl := clones(t, sb.dataset+"@"+snaps[0]); len(cl) > 0 {
		t.Errorf("clones left after SIGHUP during upload: %v", cl)
	}
	rep := backupReport(t, child.output.String())
	if up, _ := stepOf(rep, backup.StepUpload); up.Status != backup.StatusFailed {
		t.Errorf("upload step %+v, want failed", up)
	}
}

// SIGHUP during a restore from kopia ends it as SIGTERM does, with its
// error and exit status 1 (it used to be killed, status 129), and the same
// command then restores the file.
func TestRestoreSIGHUPThenResume(t *testing.T) {
	sb := newBackupSandbox(t)
	var want []byte
	for night := 1; night <= 2; night++ { // keep_local 1: night 1 is then in kopia only
		if data := sb.write(t, night); night == 1 {
			want = data
		}
		if _, stderr, err := runConfigCmd(t, "backup", "--config", sb.config); err != nil {
			t.Fatalf("night %d: %v\n%s", night, err, stderr)
		}
		nextSecond()
	}
	snaps := sb.snapshots(t)
	if len(snaps) != 1 {
		t.Fatalf("local snapshots %v, want night 2's only", snaps)
	}
	dest := t.TempDir()
	sb.gate.arm(http.MethodGet)
	spec := "latest~1:images/vm.img" // night 1, from kopia
	child := startVMHistory(t, "restore", spec, dest, "--config", sb.config)
	select {
	case <-sb.gate.held:
	case <-child.done:
		t.Fatalf("restore ended (%v) before reading a pack; output:\n%s", child.err, child.output)
	case <-time.After(2 * time.Minute):
		t.Fatalf("restore did not read a pack within 2 minutes; output:\n%s", child.output)
	}
	if err := child.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	sb.gate.release(true) // see TestBackupSIGHUPDuringUploadLeavesNoClone
	err := child.wait(t, 3*time.Minute)
	var exit *exec.ExitError
	out := strings.TrimSpace(child.output.String())
	if !errors.As(err, &exit) || exit.ExitCode() != 1 || !strings.HasPrefix(out[strings.LastIndex(out, "\n")+1:], "vmhistory: ") {
		t.Errorf("restore after SIGHUP: %v, want exit status 1 and its error; output:\n%s", err, child.output)
	}
	sb.gate.heal()
	again := startVMHistory(t, "restore", spec, dest, "--config", sb.config)
	if err := again.wait(t, 3*time.Minute); err != nil {
		t.Fatalf("restore again: %v; output:\n%s", err, again.output)
	}
	got, err := os.ReadFile(filepath.Join(dest, "vm.img"))
	if err != nil {
		t.Fatal(err)
	}
	if sha(got) != sha(want) {
		t.Errorf("restored vm.img (%d bytes) differs from night 1's (%d bytes)", len(got), len(want))
	}
	t.Logf("interrupted:\n%s\nagain:\n%s", child.output, again.output)
}
