package virt

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"
)

// Mode is how VMs are made consistent for a snapshot. The values are those
// of the configuration file's quiesce.mode.
type Mode string

// The quiesce modes.
const (
	// ModeManagedSave saves the VM with libvirt's managed save (the VM is
	// then shut off with a managed-save image) and starts it again, which
	// restores it from the image.
	ModeManagedSave Mode = "managedsave"
	// ModeSave saves the VM into SaveFile(mountpoint, vm) on the dataset, so
	// the snapshot holds its resumable state, and restores it from there;
	// the file is then removed from the live dataset.
	ModeSave Mode = "save"
	// ModeSuspend pauses the VM's CPUs and resumes them.
	ModeSuspend Mode = "suspend"
	// ModeFSFreeze freezes the guest's filesystems through the QEMU guest
	// agent and thaws them; the VM keeps running.
	ModeFSFreeze Mode = "fsfreeze"
	// ModeNone touches nothing: the snapshot is crash-consistent.
	ModeNone Mode = "none"
)

// libvirt 9.0's test driver implements all of them: managed save (the VM
// is shut off with a managed-save image, DomainCreate restores it), save to
// a file and restore, suspend and resume, and fsfreeze/thaw (it reports 2
// guest filesystems, and 0 when they are already frozen). It does not
// implement DomainAbortJob.

// Modes lists the modes, default first.
var Modes = []Mode{ModeManagedSave, ModeSave, ModeSuspend, ModeFSFreeze, ModeNone}

// ParseMode checks a mode name.
func ParseMode(s string) (Mode, error) {
	for _, m := range Modes {
		if string(m) == s {
			return m, nil
		}
	}
	names := make([]string, len(Modes))
	for i, m := range Modes {
		names[i] = string(m)
	}
	return "", fmt.Errorf("virt: unknown quiesce mode %q (want one of %s)", s, strings.Join(names, ", "))
}

// stopVerb names the quiesce operation in errors ("managedsave web01: ...").
func (m Mode) stopVerb() string { return string(m) }

// stopsGuest reports whether the mode stops the guest's CPUs (and so its
// services) for the snapshot.
func (m Mode) stopsGuest() bool {
	return m == ModeManagedSave || m == ModeSave || m == ModeSuspend
}

// resumeVerb names the operation that undoes the mode.
func (m Mode) resumeVerb() string {
	switch m {
	case ModeManagedSave:
		return "start"
	case ModeSave:
		return "restore"
	case ModeSuspend:
		return "resume"
	case ModeFSFreeze:
		return "thaw"
	}
	return "resume"
}

// Errors of Resume and Recover that tell the caller the VM is not to be
// brought back, so that a crash record naming it can be dropped (matched
// with errors.Is).
var (
	// ErrDomainGone: the domain no longer exists (undefined since it was
	// stopped).
	ErrDomainGone = errors.New("the domain no longer exists")
	// ErrNoSavedState: the VM is shut off without the managed-save image
	// or state file that stopping it left, so someone shut it down since;
	// booting it from its disks would start a VM its admin stopped.
	ErrNoSavedState = errors.New("no saved state to start it from")
)

// DefaultTimeout is the per-VM bound used when a Quiescer's SaveTimeout or
// ResumeTimeout is zero.
const DefaultTimeout = 5 * time.Minute

// SaveDirName is the directory, at the top of a dataset, that holds the
// state files of ModeSave.
const SaveDirName = ".vmhistory"

// SaveFile is where ModeSave writes vm's state on the dataset mounted at
// mountpoint: <mountpoint>/.vmhistory/<vm>.save.
func SaveFile(mountpoint, vm string) string {
	return filepath.Join(mountpoint, SaveDirName, vm+".save")
}

// Quiescer quiesces VMs for a snapshot and brings them back. Its fields are
// read, not changed, by its methods; set them before the first call.
type Quiescer struct {
	Conn *Conn
	Mode Mode
	// Mountpoint is the dataset's mountpoint; ModeSave writes its state
	// files under it (see SaveFile). Required for ModeSave.
	Mountpoint string
	// SaveTimeout bounds quiescing one VM (save, suspend, freeze) and
	// ResumeTimeout bringing one back; zero means DefaultTimeout. A
	// quiesce call that libvirt has not answered by then is still awaited
	// by Resume while the connection to libvirtd lasts: the VM is off
	// until it answers.
	SaveTimeout, ResumeTimeout time.Duration
	// Parallel is how many VMs are quiesced or resumed at once; zero or
	// less means all of them.
	Parallel int
	// OnStopping, when set, is called with a VM's name just before the VM is
	// quiesced (in every mode but none: a crash leaves a suspended VM
	// paused and a frozen one frozen too), so that the caller records it in
	// a state file and a later run can repair a crash (see Recover). If it
	// returns an error the VM is not touched. Calls are serialised.
	OnStopping func(vm string) error
	// AgentWait is how long bringing back a VM that was stopped (saved,
	// managed-saved or suspended) waits for its guest agent to answer again,
	// when it answered just before: the VM's downtime then ends when its
	// guest runs its own software, not when libvirt starts its vCPUs. Zero
	// means do not ask the agent at all (config.DefaultAgentWait is the
	// nightly job's default).
	AgentWait time.Duration

	onStoppingMu sync.Mutex
}

func (q *Quiescer) check() error {
	if q.Conn == nil {
		return errors.New("virt: quiescer without a libvirt connection")
	}
	if _, err := ParseMode(string(q.Mode)); err != nil {
		return err
	}
	if q.Mode == ModeSave && !filepath.IsAbs(q.Mountpoint) {
		return fmt.Errorf("virt: quiesce mode save needs the dataset's mountpoint as an absolute path, got %q", q.Mountpoint)
	}
	return nil
}

func (q *Quiescer) saveTimeout() time.Duration {
	if q.SaveTimeout > 0 {
		return q.SaveTimeout
	}
	return DefaultTimeout
}

func (q *Quiescer) resumeTimeout() time.Duration {
	if q.ResumeTimeout > 0 {
		return q.ResumeTimeout
	}
	return DefaultTimeout
}

// Quiesced is what one Quiesce call touched. Resume brings it back.
type Quiesced struct {
	q       *Quiescer
	vms     []*quiescedVM
	skipped []SkippedVM
}

type quiescedVM struct {
	name     string
	ref      libvirt.Domain
	lv       *libvirt.Libvirt // the connection the quiesce call went through
	started  time.Time        // just before the quiesce call
	saveFile string           // ModeSave only
	// agent is true when the guest agent answered just before the VM was
	// stopped: bringing it back then waits for the agent to answer again.
	agent bool
	done  chan struct{}

	mu      sync.Mutex
	took    time.Duration
	err     error // the quiesce call's own error, once done
	frozen  int   // filesystems frozen (ModeFSFreeze)
	settled bool
}

func (v *quiescedVM) finish(err error, frozen int) {
	v.mu.Lock()
	v.took, v.err, v.frozen, v.settled = time.Since(v.started), err, frozen, true
	v.mu.Unlock()
	close(v.done)
}

// QuiescedVM describes one VM that Quiesce touched.
type QuiescedVM struct {
	Name string
	// Started is when quiescing the VM began: its downtime starts here.
	Started time.Time
	// Took is how long quiescing took; zero while Pending.
	Took time.Duration
	// Pending is true while libvirt has not answered (the call overran its
	// timeout or the quiesce context ended); Resume waits for the answer.
	Pending bool
	// Err is the quiesce call's failure; the VM may then still be running,
	// which Resume finds out.
	Err error
	// SaveFile is the state file of ModeSave.
	SaveFile string
	// Frozen is the number of guest filesystems frozen (ModeFSFreeze).
	Frozen int
}

// SkippedVM is a VM Quiesce left alone because it was not running.
type SkippedVM struct {
	Name  string
	State State
}

// VMs are the VMs that Quiesce tried to quiesce, in the order given to
// Quiesce: each was running and is handed back by Resume.
func (q *Quiesced) VMs() []QuiescedVM {
	out := make([]QuiescedVM, 0, len(q.vms))
	for _, v := range q.vms {
		v.mu.Lock()
		out = append(out, QuiescedVM{Name: v.name, Started: v.started, Took: v.took, Pending: !v.settled,
			Err: v.err, SaveFile: v.saveFile, Frozen: v.frozen})
		v.mu.Unlock()
	}
	return out
}

// Names are the names of VMs().
func (q *Quiesced) Names() []string {
	names := make([]string, len(q.vms))
	for i, v := range q.vms {
		names[i] = v.name
	}
	return names
}

// Skipped are the VMs that were not running and so were not touched (nor
// will they be started).
func (q *Quiesced) Skipped() []SkippedVM { return q.skipped }

// Quiesce quiesces the running VMs among vms, in parallel, each bounded by
// SaveTimeout. VMs that are not running (checked again just before, not
// taken from the listing) are left alone and listed in Skipped.
//
// The result is never nil and lists every VM whose quiescing was started,
// even when some failed, timed out or ctx ended: the error (one line per
// failed VM, like "managedsave web01: ...") does not undo anything, and the
// caller must call Resume on the result in every case. A call that
// overran its timeout is asked to abort and is still awaited by Resume.
func (q *Quiescer) Quiesce(ctx context.Context, vms []Domain) (*Quiesced, error) {
	res := &Quiesced{q: q}
	if err := q.check(); err != nil {
		return res, err
	}
	if used := q.Conn.client(); !used.IsConnected() {
		if _, err := q.Conn.reconnect(ctx, used); err != nil {
			return res, fmt.Errorf("%s: nothing quiesced: the connection to libvirtd was lost: %w", q.Mode.stopVerb(), err)
		}
	}
	if q.Mode == ModeNone {
		for _, d := range vms {
			res.skipped = append(res.skipped, SkippedVM{Name: d.Name, State: d.State})
		}
		return res, nil
	}
	var uniq []Domain
	seen := map[string]bool{}
	for _, d := range vms {
		if !seen[d.Name] {
			seen[d.Name] = true
			uniq = append(uniq, d)
		}
	}
	if q.Mode == ModeSave {
		if err := makeSaveDir(q.Mountpoint); err != nil {
			return res, err
		}
	}

	type result struct {
		vm      *quiescedVM
		skipped *SkippedVM
		err     error
	}
	results := make([]result, len(uniq))
	forEach(len(uniq), q.Parallel, func(i int) {
		if err := ctx.Err(); err != nil {
			results[i].err = fmt.Errorf("%s %s: not quiesced: %w", q.Mode.stopVerb(), uniq[i].Name, context.Cause(ctx))
			return
		}
		results[i].vm, results[i].skipped, results[i].err = q.quiesceOne(ctx, uniq[i])
	})
	var errs []error
	for _, r := range results {
		if r.vm != nil {
			res.vms = append(res.vms, r.vm)
		}
		if r.skipped != nil {
			res.skipped = append(res.skipped, *r.skipped)
		}
		if r.err != nil {
			errs = append(errs, r.err)
		}
	}
	return res, errors.Join(errs...)
}

// quiesceOne quiesces one VM. It returns the VM when the quiesce call was
// made (whatever its outcome), or skipped when the VM was not running.
func (q *Quiescer) quiesceOne(ctx context.Context, d Domain) (*quiescedVM, *SkippedVM, error) {
	verb := q.Mode.stopVerb()
	ops := q.Conn.ops()
	timeout := q.saveTimeout()
	deadline := time.Now().Add(timeout)
	cctx, cancel := context.WithTimeoutCause(ctx, timeout, &TimeoutError{After: timeout, What: "save_timeout"})
	defer cancel()

	var state int32
	err := await(cctx, 0, func() error {
		var err error
		if d.ref.Name == "" { // a Domain made by the caller, not listed
			if d.ref, err = ops.DomainLookupByName(d.Name); err != nil {
				return err
			}
		}
		state, _, err = ops.DomainGetState(d.ref, 0)
		return err
	})
	if err != nil {
		if libvirt.IsNotFound(err) {
			return nil, nil, fmt.Errorf("%s %s: not quiesced: the domain no longer exists", verb, d.Name)
		}
		return nil, nil, fmt.Errorf("%s %s: not quiesced: read its state: %w", verb, d.Name, err)
	}
	if st := State(state); !st.Running() {
		return nil, &SkippedVM{Name: d.Name, State: st}, nil
	}

	vm := &quiescedVM{name: d.Name, ref: d.ref, lv: q.Conn.client(), done: make(chan struct{})}
	if q.Mode == ModeSave {
		if err := checkVMName(d.Name); err != nil {
			return nil, nil, fmt.Errorf("%s %s: not quiesced: %w", verb, d.Name, err)
		}
		vm.saveFile = SaveFile(q.Mountpoint, d.Name)
		// The VM runs, so a state file left from an earlier run is stale:
		// never let it be restored over newer disks.
		if err := os.Remove(vm.saveFile); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, nil, fmt.Errorf("%s %s: not quiesced: remove stale state file: %w", verb, d.Name, err)
		}
	}
	if q.OnStopping != nil {
		q.onStoppingMu.Lock()
		err := q.OnStopping(d.Name)
		q.onStoppingMu.Unlock()
		if err != nil {
			return nil, nil, fmt.Errorf("%s %s: not quiesced: recording it before stopping failed: %w", verb, d.Name, err)
		}
	}
	if err := cctx.Err(); err != nil {
		return nil, nil, fmt.Errorf("%s %s: not quiesced: %w", verb, d.Name, context.Cause(cctx))
	}

	if q.Mode.stopsGuest() && q.AgentWait > 0 {
		vm.agent = agentAnswers(cctx, ops, d.ref, agentProbeTimeout)
	}
	vm.started = time.Now()
	go func() {
		var err error
		frozen := 0
		switch q.Mode {
		case ModeManagedSave:
			err = ops.DomainManagedSave(d.ref, 0)
		case ModeSave:
			err = ops.DomainSave(d.ref, vm.saveFile)
		case ModeSuspend:
			err = ops.DomainSuspend(d.ref)
		case ModeFSFreeze:
			var n int32
			n, err = ops.DomainFsfreeze(d.ref, nil, 0)
			frozen = int(n)
		}
		vm.finish(err, frozen)
	}()

	select {
	case <-vm.done:
		vm.mu.Lock()
		err := vm.err
		vm.mu.Unlock()
		if err != nil {
			return vm, nil, fmt.Errorf("%s %s: %w", verb, d.Name, err)
		}
		return vm, nil, nil
	case <-cctx.Done():
	}
	// Still running inside libvirtd. Ask it to stop (qemu aborts a save
	// job and the VM keeps running); Resume waits for the call's answer.
	why := context.Cause(cctx)
	abort := "asked libvirt to abort it"
	if err := await(context.Background(), 30*time.Second, func() error { return ops.DomainAbortJob(d.ref) }); err != nil {
		abort = "could not abort it (" + err.Error() + ")"
	}
	if time.Now().Before(deadline) {
		return vm, nil, fmt.Errorf("%s %s: interrupted (%v) while libvirt was at it; %s; it is brought back once libvirt answers", verb, d.Name, why, abort)
	}
	return vm, nil, fmt.Errorf("%s %s: %v; %s; it is brought back once libvirt answers", verb, d.Name, why, abort)
}

// checkVMName refuses names that cannot be a file name in the save
// directory.
func checkVMName(name string) error {
	if name == "" || name == "." || name == ".." || strings.ContainsAny(name, "/\x00") {
		return fmt.Errorf("domain name %q cannot name a state file", name)
	}
	return nil
}

// makeSaveDir creates <mountpoint>/.vmhistory with mode 0700 (guest RAM is
// in there) and refuses anything but a real directory.
func makeSaveDir(mountpoint string) error {
	dir := filepath.Join(mountpoint, SaveDirName)
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("save: create state directory: %w", err)
	}
	fi, err := os.Lstat(dir)
	if err != nil {
		return fmt.Errorf("save: state directory: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("save: state directory %s is not a directory (%v)", dir, fi.Mode().Type())
	}
	// libvirtd writes the state files in there as root: a directory
	// another user owns would let them plant a link where one goes.
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("save: state directory %s is owned by uid %d, not by this process (uid %d); remove it, vmhistory creates it", dir, st.Uid, os.Geteuid())
	}
	if fi.Mode().Perm() != 0o700 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("save: state directory: %w", err)
		}
	}
	return nil
}

// ResumeReport says what Resume or Recover did to each VM.
type ResumeReport struct {
	VMs []VMResult
}

// VMResult is one VM of a ResumeReport.
type VMResult struct {
	Name string
	// Action says what was done, like "started from its managed-save
	// image", "resumed", "thawed 2 filesystems", "already running".
	Action string
	// Resumed is true when this call brought the VM back (started,
	// restored, resumed or thawed it).
	Resumed bool
	// Downtime is the time from the start of quiescing to the VM running
	// again (frozen or paused for fsfreeze and suspend). It is zero when the
	// VM had not been stopped, when it is not running again (see Err), and
	// for Recover, which does not know when the crashed run stopped it.
	Downtime time.Duration
	// Err says why the VM could not be brought back, or what went wrong
	// after it was (a save file that could not be removed).
	Err error
}

// Err joins the per-VM errors, nil when every VM is back.
func (r ResumeReport) Err() error {
	var errs []error
	for _, v := range r.VMs {
		if v.Err != nil {
			errs = append(errs, v.Err)
		}
	}
	return errors.Join(errs...)
}

// Resume brings back every VM that Quiesce touched, in parallel, each
// bounded by ResumeTimeout, and continues past errors. It decides from each
// VM's current state, so a VM whose quiescing failed and that still runs is
// left alone, and calling Resume twice is harmless. A quiesce call that has
// not answered yet is awaited first (at most ResumeTimeout).
//
// Pass a fresh context, not the one given to Quiesce: that one may be
// cancelled (SIGTERM during the run), and the VMs must come back anyway.
func (q *Quiesced) Resume(ctx context.Context) ResumeReport {
	rep := ResumeReport{VMs: make([]VMResult, len(q.vms))}
	forEach(len(q.vms), q.q.Parallel, func(i int) {
		rep.VMs[i] = q.resumeOne(ctx, q.vms[i])
	})
	return rep
}

func (q *Quiesced) resumeOne(ctx context.Context, vm *quiescedVM) VMResult {
	qr := q.q
	res := VMResult{Name: vm.name}
	timeout := qr.resumeTimeout()
	wait := time.NewTimer(timeout)
	defer wait.Stop()
	// A save slower than save_timeout plus resume_timeout (a VM with much
	// RAM on a slow disk) still ends with the VM off: giving up here
	// would leave it off until the next night. So the wait goes on while
	// libvirtd is there to answer; only a lost connection ends it.
	select {
	case <-vm.done:
	case <-wait.C:
		select {
		case <-vm.done:
		case <-vm.lv.Disconnected():
			res.Err = fmt.Errorf("%s %s: libvirt had not finished %s after %v more (resume_timeout) when the connection to libvirtd was lost: cannot bring it back now; the next run recovers it",
				qr.Mode.resumeVerb(), vm.name, qr.Mode.stopVerb(), timeout)
			return res
		case <-ctx.Done():
			res.Err = fmt.Errorf("%s %s: %w while waiting for libvirt to finish %s", qr.Mode.resumeVerb(), vm.name, context.Cause(ctx), qr.Mode.stopVerb())
			return res
		}
	case <-ctx.Done():
		res.Err = fmt.Errorf("%s %s: %w while waiting for libvirt to finish %s", qr.Mode.resumeVerb(), vm.name, context.Cause(ctx), qr.Mode.stopVerb())
		return res
	}
	res.Action, res.Resumed, res.Err = qr.bringBackRetrying(ctx, vm.name, func() (libvirt.Domain, error) { return vm.ref, nil })
	if res.Resumed && res.Err == nil {
		res.Downtime = time.Since(vm.started)
		if vm.agent {
			// libvirt calls a VM running as soon as QEMU's vCPUs are
			// started, but a guest restored from its RAM is slow for a
			// while (its caches, TCG's translated code), and its services
			// answer later: the downtime a user of the VM sees ends when
			// the guest runs its own software again.
			if agentAnswers(ctx, qr.Conn.ops(), vm.ref, qr.AgentWait) {
				res.Downtime = time.Since(vm.started)
				res.Action += ", its guest agent answering " + roundMillis(res.Downtime) + " after it was stopped"
			} else {
				res.Action += fmt.Sprintf(", its guest agent (answering before) not answering within %v", qr.AgentWait)
			}
		}
	}
	return res
}

// agentProbeTimeout bounds asking the guest agent, before a VM is stopped,
// whether it answers.
const agentProbeTimeout = 2 * time.Second

// agentAnswers asks the guest agent for the guest's clock, retrying while
// it does not answer, for at most wait. It is a read-only call that needs
// the agent running inside the guest (libvirt answers "agent is not
// connected" right away while QEMU's end of the channel is closed).
func agentAnswers(ctx context.Context, o ops, ref libvirt.Domain, wait time.Duration) bool {
	ctx, cancel := context.WithTimeout(ctx, wait)
	defer cancel()
	for {
		err := await(ctx, 0, func() error {
			_, _, err := o.DomainGetTime(ref, 0)
			return err
		})
		if err == nil {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func roundMillis(d time.Duration) string {
	if d < time.Second {
		return d.Round(time.Millisecond).String()
	}
	return d.Round(10 * time.Millisecond).String()
}

// Recover repairs what an interrupted run left behind: it brings back the
// named VMs (those the crashed run recorded through OnStopping), with the
// Quiescer's Mode and Mountpoint set as that run had them. Each is handled
// by its current state: a paused one is resumed, a shut-off one is restored
// from its state file (ModeSave) or started (libvirt restores a managed-save
// image), a running one is left alone (thawed in ModeFSFreeze; a stale save
// file is removed). A shut-off VM is started only in the modes that shut VMs
// off (managedsave, save), and only from the state stopping it left: one
// without it was shut down since and stays off (ErrNoSavedState). A VM
// undefined since fails with ErrDomainGone. No VM outside names is ever
// touched.
func (q *Quiescer) Recover(ctx context.Context, names []string) ResumeReport {
	var uniq []string
	seen := map[string]bool{}
	for _, n := range names {
		if !seen[n] {
			seen[n] = true
			uniq = append(uniq, n)
		}
	}
	rep := ResumeReport{VMs: make([]VMResult, len(uniq))}
	if err := q.check(); err != nil {
		for i, n := range uniq {
			rep.VMs[i] = VMResult{Name: n, Err: fmt.Errorf("recover %s: %w", n, err)}
		}
		return rep
	}
	forEach(len(uniq), q.Parallel, func(i int) {
		name := uniq[i]
		res := VMResult{Name: name}
		res.Action, res.Resumed, res.Err = q.bringBackRetrying(ctx, name, func() (libvirt.Domain, error) {
			var ref libvirt.Domain
			err := await(ctx, q.resumeTimeout(), func() error {
				var err error
				ref, err = q.Conn.ops().DomainLookupByName(name)
				return err
			})
			switch {
			case libvirt.IsNotFound(err):
				return ref, fmt.Errorf("recover %s: %w (undefined since the interrupted run?)", name, ErrDomainGone)
			case err != nil:
				return ref, fmt.Errorf("recover %s: look it up: %w", name, err)
			}
			return ref, nil
		})
		rep.VMs[i] = res
	})
	return rep
}

// bringBackRetrying looks the domain up and brings it back, and does both
// once more after reconnecting when the connection to libvirtd was lost
// (libvirtd restarted): the VMs must come back all the same.
func (q *Quiescer) bringBackRetrying(ctx context.Context, name string, lookup func() (libvirt.Domain, error)) (string, bool, error) {
	try := func() (string, bool, error) {
		ref, err := lookup()
		if err != nil {
			return "", false, err
		}
		return q.bringBack(ctx, name, ref)
	}
	used := q.Conn.client()
	action, resumed, err := try()
	if err == nil {
		return action, resumed, nil
	}
	retry, rerr := q.Conn.reconnect(ctx, used)
	if rerr != nil {
		return action, resumed, fmt.Errorf("%w (the connection to libvirtd was lost, and reconnecting failed: %v)", err, rerr)
	}
	if !retry {
		return action, resumed, err
	}
	return try()
}

// bringBack undoes the mode on one VM according to its current state,
// within ResumeTimeout.
func (q *Quiescer) bringBack(ctx context.Context, name string, ref libvirt.Domain) (action string, resumed bool, err error) {
	verb := q.Mode.resumeVerb()
	ops := q.Conn.ops()
	timeout := q.resumeTimeout()
	ctx, cancel := context.WithTimeoutCause(ctx, timeout, &TimeoutError{After: timeout, What: "resume_timeout"})
	defer cancel()
	fail := func(format string, args ...any) (string, bool, error) {
		return "", false, fmt.Errorf("%s %s: %s", verb, name, fmt.Sprintf(format, args...))
	}

	var state int32
	if err := await(ctx, 0, func() error {
		var err error
		state, _, err = ops.DomainGetState(ref, 0)
		return err
	}); err != nil {
		if libvirt.IsNotFound(err) {
			return "", false, fmt.Errorf("%s %s: %w", verb, name, ErrDomainGone)
		}
		return fail("read its state: %v", err)
	}
	st := State(state)
	saveFile := ""
	if q.Mode == ModeSave {
		if err := checkVMName(name); err != nil {
			return fail("%v", err)
		}
		saveFile = SaveFile(q.Mountpoint, name)
	}

	switch {
	case st.Running():
		switch q.Mode {
		case ModeFSFreeze:
			var n int32
			if err := await(ctx, 0, func() error {
				var err error
				n, err = ops.DomainFsthaw(ref, nil, 0)
				return err
			}); err != nil {
				return fail("%v", err)
			}
			return fmt.Sprintf("thawed %d filesystems", n), true, nil
		case ModeSave:
			// Saving failed or never happened: the file, if any, is stale.
			if err := os.Remove(saveFile); err != nil && !errors.Is(err, os.ErrNotExist) {
				return "already running", false, fmt.Errorf("%s %s: already running, but its stale state file could not be removed: %w", verb, name, err)
			}
		}
		return "already running", false, nil

	case st == StatePaused:
		if q.Mode == ModeFSFreeze || q.Mode == ModeNone {
			return fail("is paused, and %s never pauses a VM: something else did, not resuming it", q.Mode)
		}
		if err := await(ctx, 0, func() error { return ops.DomainResume(ref) }); err != nil {
			return fail("resume the paused VM: %v", err)
		}
		return "resumed", true, nil

	case st == StateShutoff:
		switch q.Mode {
		case ModeManagedSave, ModeSave:
		default:
			return fail("is shut off, and %s never shuts a VM off: something else did, not starting it", q.Mode)
		}
		if saveFile != "" {
			fi, err := os.Stat(saveFile)
			switch {
			case err == nil:
				if stale, why := q.staleSaveFile(ctx, ref, fi); stale {
					// It ran after the save and was shut down since.
					return "left shut off", false, fmt.Errorf("%s %s: left shut off, not restoring %s: %s, so it ran and was shut down since it was saved (remove the file): %w", verb, name, saveFile, why, ErrNoSavedState)
				}
				if err := await(ctx, 0, func() error { return ops.DomainRestore(saveFile) }); err != nil {
					return fail("restore from %s: %v", saveFile, err)
				}
				if err := os.Remove(saveFile); err != nil {
					return "restored from " + saveFile, true, fmt.Errorf("%s %s: restored, but its state file could not be removed (it must not be restored again): %w", verb, name, err)
				}
				return "restored from " + saveFile, true, nil
			case !errors.Is(err, os.ErrNotExist):
				return fail("state file: %v", err)
			}
		}
		var image int32
		if err := await(ctx, 0, func() error {
			var err error
			image, err = ops.DomainHasManagedSaveImage(ref, 0)
			return err
		}); err != nil {
			return fail("%v", err)
		}
		if image == 0 {
			// Stopping it left a state to start from; without one, the
			// VM was shut down since, by its admin: it stays off.
			what := "managed-save image"
			if saveFile != "" {
				what = "state file " + saveFile + " (nor managed-save image)"
			}
			return "left shut off", false, fmt.Errorf("%s %s: left shut off: it has no %s, so it was shut down since it was stopped: %w", verb, name, what, ErrNoSavedState)
		}
		if err := await(ctx, 0, func() error { return ops.DomainCreate(ref) }); err != nil {
			return fail("%v", err)
		}
		return "started from its managed-save image", true, nil
	}
	return fail("is %s: not touching it", st)
}

// staleSaveFile reports whether a ModeSave state file is older than one of
// the domain's disk files, which means the VM ran after it was saved and
// restoring the file would put old memory over newer disks.
func (q *Quiescer) staleSaveFile(ctx context.Context, ref libvirt.Domain, save os.FileInfo) (bool, string) {
	var desc string
	err := await(ctx, 0, func() error {
		var err error
		desc, err = q.Conn.client().DomainGetXMLDesc(ref, 0)
		return err
	})
	if err != nil {
		return false, ""
	}
	disks, err := parseDisks(desc)
	if err != nil {
		return false, ""
	}
	for _, d := range disks {
		if d.Type != "file" || d.Device == "cdrom" || d.Device == "floppy" || !d.Local() {
			continue
		}
		fi, err := os.Stat(d.Source)
		if err == nil && fi.ModTime().After(save.ModTime()) {
			return true, fmt.Sprintf("disk %s was written after the state file was saved (%s > %s)",
				d.Source, fi.ModTime().Format(time.RFC3339), save.ModTime().Format(time.RFC3339))
		}
	}
	return false, ""
}

// forEach runs fn(0..n-1) with at most limit at once (limit <= 0: all).
func forEach(n, limit int, fn func(i int)) {
	if limit <= 0 || limit > n {
		limit = n
	}
	sem := make(chan struct{}, max(limit, 1))
	var wg sync.WaitGroup
	for i := 0; i < n; i++ {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			fn(i)
		}()
	}
	wg.Wait()
}
