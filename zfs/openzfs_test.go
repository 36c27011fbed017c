package zfs

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/vmhistory/vmhistory/runner"
)

// recordedRunner answers commands with output recorded on OpenZFS hosts
// (OpenZFS 2.1 on Debian 12), for the paths zfs-fuse cannot take here.
type recordedRunner struct {
	answers map[string]recorded
	calls   []string
	stdin   []byte
}

type recorded struct {
	stdout string
	stderr string
	exit   int
}

func (r *recordedRunner) Where() string { return "ssh://root@openzfs-host:22" }

func (r *recordedRunner) Run(ctx context.Context, c runner.Cmd) ([]byte, error) {
	line := c.String()
	r.calls = append(r.calls, line)
	if c.Stdin != nil {
		r.stdin, _ = io.ReadAll(c.Stdin)
	}
	a, ok := r.answers[line]
	if !ok {
		return nil, &runner.Error{Where: r.Where(), Cmd: line, ExitCode: 127, Stderr: "no recording for this command", Err: fmt.Errorf("exit status 127")}
	}
	if a.exit != 0 {
		return nil, &runner.Error{Where: r.Where(), Cmd: line, ExitCode: a.exit, Stderr: a.stderr, Err: fmt.Errorf("exit status %d", a.exit)}
	}
	if c.Stdout != nil {
		_, err := io.WriteString(c.Stdout, a.stdout)
		return nil, err
	}
	return []byte(a.stdout), nil
}

const openzfsVersion = "zfs-2.1.11-1\nzfs-kmod-2.1.11-1\n"

func newRecorded(answers map[string]recorded) (*ZFS, *recordedRunner) {
	r := &recordedRunner{answers: answers}
	if _, ok := answers["zfs version"]; !ok {
		answers["zfs version"] = recorded{stdout: openzfsVersion}
	}
	return New(r, Options{}), r
}

func TestOpenZFSDetected(t *testing.T) {
	z, _ := newRecorded(map[string]recorded{})
	f, err := z.Features(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	want := Features{Dialect: "openzfs", Version: "2.1.11-1", ResumableReceive: true, ListHolds: true, RawSend: true}
	if f != want {
		t.Errorf("features %+v, want %+v", f, want)
	}
}

func TestLegacyDetectedFromUnrecognizedCommand(t *testing.T) {
	z, _ := newRecorded(map[string]recorded{
		// zfs-fuse 0.7.0's answer, recorded on this machine kind.
		"zfs version": {exit: 2, stderr: "unrecognized command 'version'\nusage: zfs command args ..."},
	})
	f, err := z.Features(context.Background())
	if err != nil || f.Dialect != "legacy" || f.ResumableReceive {
		t.Errorf("features %+v, %v; want legacy", f, err)
	}
	// Any other failure is not taken for a dialect.
	z2, _ := newRecorded(map[string]recorded{"zfs version": {exit: 255, stderr: "ssh: connect to host x port 22: Connection refused"}})
	if _, err := z2.Features(context.Background()); err == nil {
		t.Error("a failed ssh connection was taken for a zfs dialect")
	}
}

func TestOpenZFSSnapshotListing(t *testing.T) {
	// OpenZFS lists child filesystems and their snapshots under -d 1 too.
	out := strings.Join([]string{
		"DATA/libvirt\tguid\t8412436253154069873",
		"DATA/libvirt\tcreatetxg\t1",
		"DATA/libvirt\tcreation\t1677900001",
		"DATA/libvirt\tused\t1539316678656",
		"DATA/libvirt\treferenced\t1412316678656",
		"DATA/libvirt\tuserrefs\t-",
		"DATA/libvirt/images\tguid\t1",
		"DATA/libvirt@2023-03-11_05:00:01\tguid\t17298746389216187236",
		"DATA/libvirt@2023-03-11_05:00:01\tcreatetxg\t992100",
		"DATA/libvirt@2023-03-11_05:00:01\tcreation\t1678510801",
		"DATA/libvirt@2023-03-11_05:00:01\tused\t4406636445",
		"DATA/libvirt@2023-03-11_05:00:01\treferenced\t1398101434368",
		"DATA/libvirt@2023-03-11_05:00:01\tuserrefs\t1",
		"DATA/libvirt@2023-03-04_05:00:01\tguid\t5316129865532342290",
		"DATA/libvirt@2023-03-04_05:00:01\tcreatetxg\t981234",
		"DATA/libvirt@2023-03-04_05:00:01\tcreation\t1677906001",
		"DATA/libvirt@2023-03-04_05:00:01\tused\t9173123072",
		"DATA/libvirt@2023-03-04_05:00:01\treferenced\t1391024134144",
		"DATA/libvirt@2023-03-04_05:00:01\tuserrefs\t0",
		"",
	}, "\n")
	z, r := newRecorded(map[string]recorded{
		"zfs get -Hp -r -d 1 -o name,property,value guid,createtxg,creation,used,referenced,userrefs DATA/libvirt": {stdout: out},
	})
	snaps, err := z.Snapshots(context.Background(), "DATA/libvirt")
	if err != nil {
		t.Fatal(err)
	}
	if len(snaps) != 2 || snaps[0].Name != "2023-03-04_05:00:01" || snaps[1].Name != "2023-03-11_05:00:01" {
		t.Fatalf("snapshots %+v", snaps)
	}
	s := snaps[1]
	if s.GUID != 17298746389216187236 || s.CreateTXG != 992100 || s.Creation.Unix() != 1678510801 ||
		s.Used != 4406636445 || s.Referenced != 1398101434368 || s.UserRefs != 1 {
		t.Errorf("parsed %+v", s)
	}
	if len(r.calls) != 1 {
		t.Errorf("calls %v", r.calls)
	}
}

func TestOpenZFSResumeToken(t *testing.T) {
	token := "1-10e4d5e2e3-f0-789c636064000310a500c4ec50360710e72765a526973030f43383"
	z, r := newRecorded(map[string]recorded{
		"zfs get -Hp -o property,value receive_resume_token BACKUP/libvirt": {stdout: "receive_resume_token\t" + token + "\n"},
		"zfs get -Hp -o property,value receive_resume_token BACKUP/other":   {stdout: "receive_resume_token\t-\n"},
		"zfs send -t " + token:          {stdout: "STREAM"},
		"zfs receive -s BACKUP/libvirt": {},
	})
	ctx := context.Background()
	got, err := z.ResumeToken(ctx, "BACKUP/libvirt")
	if err != nil || got != token {
		t.Fatalf("token %q, %v", got, err)
	}
	if got, err := z.ResumeToken(ctx, "BACKUP/other"); err != nil || got != "" {
		t.Errorf("no interrupted receive: %q, %v", got, err)
	}
	var buf bytes.Buffer
	if err := z.Send(ctx, SendOptions{ResumeToken: token}, &buf); err != nil || buf.String() != "STREAM" {
		t.Fatalf("resumed send: %q, %v", buf.String(), err)
	}
	if err := z.Receive(ctx, "BACKUP/libvirt", strings.NewReader("STREAM"), ReceiveOptions{Resumable: true}); err != nil {
		t.Fatalf("resumable receive: %v (calls %v)", err, r.calls)
	}
	if string(r.stdin) != "STREAM" {
		t.Errorf("receive got %q on stdin", r.stdin)
	}
}

func TestOpenZFSReceiveErrorsNamed(t *testing.T) {
	z, _ := newRecorded(map[string]recorded{
		"zfs receive BACKUP/modified": {exit: 1, stderr: "cannot receive incremental stream: destination BACKUP/modified has been modified\nsince most recent snapshot"},
		"zfs receive BACKUP/exists":   {exit: 1, stderr: "cannot receive new filesystem stream: destination 'BACKUP/exists' exists\nmust specify -F to overwrite it"},
		"zfs receive BACKUP/mismatch": {exit: 1, stderr: "cannot receive incremental stream: most recent snapshot of BACKUP/mismatch does not\nmatch incremental source"},
		"zfs receive BACKUP/partial":  {exit: 1, stderr: "cannot receive incremental stream: destination BACKUP/partial contains\npartially-complete state from \"zfs receive -s\"."},
	})
	ctx := context.Background()
	for ds, want := range map[string]error{"BACKUP/modified": ErrDiverged, "BACKUP/exists": ErrDestinationExists, "BACKUP/mismatch": ErrDiverged,
		"BACKUP/partial": ErrPartialReceive} {
		err := z.Receive(ctx, ds, strings.NewReader(""), ReceiveOptions{})
		if !errors.Is(err, want) {
			t.Errorf("%s: %v, want %v", ds, err, want)
		}
		if err != nil && !strings.Contains(err.Error(), ds) {
			t.Errorf("%s: error %q does not name the dataset", ds, err)
		}
	}
}

func TestOpenZFSSnapshotDirectoryUsedWithoutClone(t *testing.T) {
	mp := t.TempDir()
	z, r := newRecorded(map[string]recorded{
		"zfs get -Hp -o property,value guid DATA/libvirt@2023-03-04_05:00:01": {stdout: "guid\t5316129865532342290\n"},
		"zfs get -Hp -o property,value mountpoint,mounted DATA/libvirt":       {stdout: "mountpoint\t" + mp + "\nmounted\tyes\n"},
		"test -d " + mp + "/.zfs/snapshot/2023-03-04_05:00:01":                {},
		"zfs get -Hp -o property,value guid DATA/libvirt@2023-03-11_05:00:01": {stdout: "guid\t17298746389216187236\n"},
	})
	ctx := context.Background()
	v, err := z.OpenSnapshot(ctx, "DATA/libvirt@2023-03-04_05:00:01")
	if err != nil {
		t.Fatal(err)
	}
	if v.Clone != "" || v.Root != mp+"/.zfs/snapshot/2023-03-04_05:00:01" {
		t.Errorf("view %+v, want the .zfs/snapshot directory", v)
	}
	if err := v.Close(ctx); err != nil {
		t.Error(err)
	}
	for _, c := range r.calls {
		if strings.Contains(c, "clone") || strings.Contains(c, "destroy") {
			t.Errorf("unexpected command %q", c)
		}
	}
}

func TestOpenZFSHoldsFromProperties(t *testing.T) {
	out := "type\tsnapshot\t-\n" +
		"userrefs\t2\t-\n" +
		"vmhistory:hold:replica-base\t2026-11-20T05:00:31Z\tlocal\n" +
		"vmhistory:hold:mount\t2026-11-21T09:12:00Z\tlocal\n" +
		"vmhistory:hold:received\t2026-11-21T09:12:00Z\treceived\n"
	if got := strings.Join(parseHoldProperties(out), ","); got != "mount,replica-base" {
		t.Errorf("holds %q", got)
	}
}

func TestLocalSnapshotPropertyOnlyLocal(t *testing.T) {
	// A value inherited from the dataset or received with `send -p` is no
	// proof about the snapshot itself; a child's snapshots are not ours.
	out := "DATA/libvirt\tx\tlocal\n" +
		"DATA/libvirt@2023-03-04_05:00:01\t20230304T050001Z-1a2b3c4d\tlocal\n" +
		"DATA/libvirt@2023-03-11_05:00:01\tx\tinherited from DATA/libvirt\n" +
		"DATA/libvirt@2023-03-18_05:00:01\tr\treceived\n" +
		"DATA/libvirt@2023-03-25_05:00:01\t-\t-\n" +
		"DATA/libvirt/images\tx\tlocal\n"
	z, _ := newRecorded(map[string]recorded{
		"zfs get -Hp -r -d 1 -o name,value,source vmhistory:run DATA/libvirt": {stdout: out},
	})
	got, err := z.LocalSnapshotProperty(context.Background(), "DATA/libvirt", "vmhistory:run")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got["2023-03-04_05:00:01"] != "20230304T050001Z-1a2b3c4d" {
		t.Errorf("local values %v, want only 2023-03-04_05:00:01's", got)
	}
}

func TestOpenZFSStaleResumeTokenNamed(t *testing.T) {
	// libzfs_sendrecv.c's texts for a token that can no longer be sent.
	stale := map[string]string{
		"1-gone":    "cannot resume send: 'DATA/libvirt@2023-03-11_05:00:01' used in the initial send no longer exists",
		"1-renamed": "cannot resume send: 'DATA/libvirt@2023-03-11_05:00:01' is no longer the same snapshot used in the initial send",
		"1-base":    "cannot resume send: incremental source 0xeff8f6fc0a5ad7e4 no longer exists",
		"1-corrupt": "cannot resume send: resume token is corrupt (invalid format)",
	}
	answers := map[string]recorded{"zfs send -t 1-link": {exit: 255, stderr: "ssh: connect to host backup port 22: Connection refused"}}
	for tok, msg := range stale {
		answers["zfs send -t "+tok] = recorded{exit: 1, stderr: msg}
	}
	z, _ := newRecorded(answers)
	ctx := context.Background()
	for tok := range stale {
		if err := z.Send(ctx, SendOptions{ResumeToken: tok}, io.Discard); !errors.Is(err, ErrStaleResumeToken) {
			t.Errorf("%s: %v, want ErrStaleResumeToken", tok, err)
		}
	}
	if err := z.Send(ctx, SendOptions{ResumeToken: "1-link"}, io.Discard); err == nil || errors.Is(err, ErrStaleResumeToken) {
		t.Errorf("a dropped link taken for a stale token: %v", err)
	}
}

func TestOpenZFSAbortReceive(t *testing.T) {
	z, r := newRecorded(map[string]recorded{"zfs receive -A BACKUP/libvirt": {}})
	if err := z.AbortReceive(context.Background(), "BACKUP/libvirt"); err != nil {
		t.Fatal(err)
	}
	if r.calls[len(r.calls)-1] != "zfs receive -A BACKUP/libvirt" {
		t.Errorf("calls %q", r.calls)
	}
	legacy, lr := newRecorded(map[string]recorded{"zfs version": {exit: 2, stderr: "unrecognized command 'version'"}})
	if err := legacy.AbortReceive(context.Background(), "BACKUP/libvirt"); !errors.Is(err, ErrNotSupported) {
		t.Errorf("legacy abort: %v", err)
	}
	for _, c := range lr.calls {
		if strings.Contains(c, "receive") {
			t.Errorf("legacy zfs was given %q", c)
		}
	}
}
