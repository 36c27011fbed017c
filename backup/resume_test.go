package backup

import (
	"context"
	"fmt"
	"io"
	"strings"
	"sync"
	"testing"

	"github.com/vmhistory/vmhistory/runner"
	"github.com/vmhistory/vmhistory/zfs"
)

// zfs-fuse has no resumable receives, so the OpenZFS resume path runs on
// command output as OpenZFS 2.1 prints it (formats as in zfs/openzfs_test.go,
// error texts those of libzfs_sendrecv.c).

type answer struct {
	stdout, stderr string
	exit           int
}

// scriptedRunner answers each command line with its recorded answers in
// turn, the last one repeated. A key ending in "*" matches any line it
// starts (for values that hold the time).
type scriptedRunner struct {
	where   string
	mu      sync.Mutex
	answers map[string][]answer
	calls   []string
	stdin   map[string]string
}

func newScripted(where string, answers map[string][]answer) *scriptedRunner {
	if _, ok := answers["zfs version"]; !ok {
		answers["zfs version"] = []answer{{stdout: "zfs-2.1.11-1\nzfs-kmod-2.1.11-1\n"}}
	}
	return &scriptedRunner{where: where, answers: answers, stdin: map[string]string{}}
}

func (r *scriptedRunner) Where() string { return r.where }

func (r *scriptedRunner) Run(ctx context.Context, c runner.Cmd) ([]byte, error) {
	line := c.String()
	var in []byte
	if c.Stdin != nil {
		in, _ = io.ReadAll(c.Stdin)
	}
	r.mu.Lock()
	r.calls = append(r.calls, line)
	if c.Stdin != nil {
		r.stdin[line] += string(in)
	}
	key := line
	if _, ok := r.answers[key]; !ok {
		for k := range r.answers {
			if p, ok := strings.CutSuffix(k, "*"); ok && strings.HasPrefix(line, p) {
				key = k
			}
		}
	}
	list := r.answers[key]
	var a answer
	switch {
	case len(list) == 0:
		a = answer{exit: 127, stderr: "no recording for: " + line}
	case len(list) == 1:
		a = list[0]
	default:
		a, r.answers[key] = list[0], list[1:]
	}
	r.mu.Unlock()
	if a.exit != 0 {
		return nil, &runner.Error{Where: r.where, Cmd: line, ExitCode: a.exit, Stderr: a.stderr, Err: fmt.Errorf("exit status %d", a.exit)}
	}
	if c.Stdout != nil {
		_, err := io.WriteString(c.Stdout, a.stdout)
		return nil, err
	}
	return []byte(a.stdout), nil
}

func (r *scriptedRunner) ran(prefix string) []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var got []string
	for _, c := range r.calls {
		if strings.HasPrefix(c, prefix) {
			got = append(got, c)
		}
	}
	return got
}

const (
	snapListing = "zfs get -Hp -r -d 1 -o name,property,value guid,createtxg,creation,used,referenced,userrefs "
	runListing  = "zfs get -Hp -r -d 1 -o name,value,source vmhistory:run "
	holdListing = "zfs get -Hp -r -d 1 -o name,value,source vmhistory:hold:vmhistory-replica "
	token       = "1-10e4d5e2e3-f0-789c636064000310a500c4ec50360710e72765a526973030f43383"
)

type recSnap struct {
	name string
	guid uint64
	txg  uint64
	refs int
}

var (
	recN1 = recSnap{"2023-03-04_05:00:01", 5316129865532342290, 981234, 0}
	recN2 = recSnap{"2023-03-11_05:00:01", 17298746389216187236, 992100, 0}
	recN3 = recSnap{"2023-03-18_05:00:01", 1139216503470221171, 1003310, 0}
)

func listing(dataset string, snaps ...recSnap) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s\tguid\t8412436253154069873\n%s\tcreatetxg\t1\n", dataset, dataset)
	for _, s := range snaps {
		n := dataset + "@" + s.name
		fmt.Fprintf(&b, "%s\tguid\t%d\n%s\tcreatetxg\t%d\n%s\tcreation\t%d\n%s\tused\t4406636445\n%s\treferenced\t1398101434368\n%s\tuserrefs\t%d\n",
			n, s.guid, n, s.txg, n, 1677906001+int(s.txg-981234), n, n, n, s.refs)
	}
	return b.String()
}

func runProps(dataset string, snaps ...recSnap) string {
	out := dataset + "\t-\t-\n"
	for _, s := range snaps {
		out += dataset + "@" + s.name + "\t20230304T050001Z-" + s.name[:10] + "\tlocal\n"
	}
	return out
}

func heldOn(dataset string, snaps ...recSnap) string {
	out := dataset + "\t-\t-\n"
	for _, s := range snaps {
		out += dataset + "@" + s.name + "\t2023-03-11T05:00:31Z\tlocal\n"
	}
	return out
}

// holdMoves answers moving the base hold from one snapshot to another.
func holdMoves(answers map[string][]answer, dataset string, from, to recSnap) {
	answers["zfs hold vmhistory-replica "+dataset+"@"+to.name] = []answer{{}}
	answers["zfs set vmhistory:hold:vmhistory-replica=*"] = []answer{{}}
	answers[holdListing+dataset] = []answer{{stdout: heldOn(dataset, from, to)}}
	answers["zfs release vmhistory-replica "+dataset+"@"+from.name] = []answer{{}}
	answers["zfs inherit vmhistory:hold:vmhistory-replica "+dataset+"@"+from.name] = []answer{{}}
}

func openzfsPair(src, dst map[string][]answer) (*Replicator, *scriptedRunner, *scriptedRunner) {
	s := newScripted("local", src)
	d := newScripted("ssh://root@backup:22", dst)
	r := &Replicator{Source: zfs.New(s, zfs.Options{}), Replica: zfs.New(d, zfs.Options{}),
		SourceDataset: "DATA/libvirt", ReplicaDataset: "BACKUP/libvirt"}
	return r, s, d
}

// An interrupted `send -I n1 n3` left n2 half-received on an OpenZFS
// replica. The next run resumes it with `send -t` into `receive -s`, then
// sends n2 -> n3 as usual.
func TestReplicationResumesInterruptedReceive(t *testing.T) {
	src := map[string][]answer{
		snapListing + "DATA/libvirt": {{stdout: listing("DATA/libvirt", recN1, recN2, recN3)}},
		runListing + "DATA/libvirt":  {{stdout: runProps("DATA/libvirt", recN1, recN2, recN3)}},
		"zfs send -t " + token:       {{stdout: "RESUMED-STREAM"}},
		"zfs send -I DATA/libvirt@" + recN2.name + " DATA/libvirt@" + recN3.name: {{stdout: "INCREMENTAL-STREAM"}},
	}
	holdMoves(src, "DATA/libvirt", recN1, recN3)
	dst := map[string][]answer{
		"zfs get -H -o value guid BACKUP/libvirt":                           {{stdout: "7691008105353218483\n"}},
		"zfs get -Hp -o property,value receive_resume_token BACKUP/libvirt": {{stdout: "receive_resume_token\t" + token + "\n"}},
		"zfs receive -s BACKUP/libvirt":                                     {{}},
		snapListing + "BACKUP/libvirt": {
			{stdout: listing("BACKUP/libvirt", recN1, recN2)},
			{stdout: listing("BACKUP/libvirt", recN1, recN2, recN3)},
		},
		runListing + "BACKUP/libvirt": {{stdout: runProps("BACKUP/libvirt", recN1, recN2)}},
		"zfs set vmhistory:run=20230304T050001Z-2023-03-18 BACKUP/libvirt@" + recN3.name: {{}},
	}
	holdMoves(dst, "BACKUP/libvirt", recN1, recN3)
	r, s, d := openzfsPair(src, dst)
	res, err := r.Run(context.Background())
	if err != nil {
		t.Fatalf("%v\nsource ran %q\nreplica ran %q", err, s.calls, d.calls)
	}
	if !res.Resumed || res.Base != recN2.name || strings.Join(res.Sent, ",") != recN3.name {
		t.Errorf("result %+v: want resumed, then %s -> %s", res, recN2.name, recN3.name)
	}
	if got := d.stdin["zfs receive -s BACKUP/libvirt"]; got != "RESUMED-STREAMINCREMENTAL-STREAM" {
		t.Errorf("the replica received %q: want the resumed stream, then the incremental", got)
	}
	if got := d.ran("zfs receive -A"); len(got) != 0 {
		t.Errorf("a resumable receive was aborted: %q", got)
	}
	if got := d.ran("zfs set vmhistory:run="); len(got) != 1 {
		t.Errorf("the received snapshot was not marked as vmhistory's: %q", got)
	}
}

// The snapshot the token names was pruned on the source: `send -t` fails
// as OpenZFS says, the partial receive is aborted on the replica dataset
// alone, and the incremental from the newest common snapshot follows.
func TestReplicationAbortsStaleResumeToken(t *testing.T) {
	src := map[string][]answer{
		snapListing + "DATA/libvirt": {{stdout: listing("DATA/libvirt", recN1, recN3)}},
		runListing + "DATA/libvirt":  {{stdout: runProps("DATA/libvirt", recN1, recN3)}},
		"zfs send -t " + token:       {{exit: 1, stderr: "cannot resume send: 'DATA/libvirt@" + recN2.name + "' used in the initial send no longer exists\n"}},
		"zfs send -I DATA/libvirt@" + recN1.name + " DATA/libvirt@" + recN3.name: {{stdout: "INCREMENTAL-STREAM"}},
	}
	holdMoves(src, "DATA/libvirt", recN1, recN3)
	dst := map[string][]answer{
		"zfs get -H -o value guid BACKUP/libvirt":                           {{stdout: "7691008105353218483\n"}},
		"zfs get -Hp -o property,value receive_resume_token BACKUP/libvirt": {{stdout: "receive_resume_token\t" + token + "\n"}},
		"zfs receive -s BACKUP/libvirt":                                     {{}},
		"zfs receive -A BACKUP/libvirt":                                     {{}},
		snapListing + "BACKUP/libvirt": {
			{stdout: listing("BACKUP/libvirt", recN1)},
			{stdout: listing("BACKUP/libvirt", recN1, recN3)},
		},
		runListing + "BACKUP/libvirt": {{stdout: runProps("BACKUP/libvirt", recN1)}},
		"zfs set vmhistory:run=20230304T050001Z-2023-03-18 BACKUP/libvirt@" + recN3.name: {{}},
	}
	holdMoves(dst, "BACKUP/libvirt", recN1, recN3)
	r, s, d := openzfsPair(src, dst)
	res, err := r.Run(context.Background())
	if err != nil {
		t.Fatalf("%v\nsource ran %q\nreplica ran %q", err, s.calls, d.calls)
	}
	if res.Resumed || !strings.Contains(res.AbortedResume, "no longer exists") {
		t.Errorf("result %+v: want the stale token reported as aborted", res)
	}
	if got := d.ran("zfs receive -A"); strings.Join(got, ";") != "zfs receive -A BACKUP/libvirt" {
		t.Errorf("aborted %q, want only BACKUP/libvirt", got)
	}
	if res.Base != recN1.name || strings.Join(res.Sent, ",") != recN3.name {
		t.Errorf("after the abort: %+v, want %s -> %s", res, recN1.name, recN3.name)
	}
	if got := d.stdin["zfs receive -s BACKUP/libvirt"]; !strings.HasSuffix(got, "INCREMENTAL-STREAM") {
		t.Errorf("the incremental did not follow the abort: %q", got)
	}
}

// A resume that fails for another reason (the link dropped) keeps the
// partial receive for the next run: nothing is aborted.
func TestReplicationKeepsPartialReceiveWhenResumeFails(t *testing.T) {
	src := map[string][]answer{
		snapListing + "DATA/libvirt": {{stdout: listing("DATA/libvirt", recN1, recN2)}},
		"zfs send -t " + token:       {{stdout: "RESUMED-STREAM"}},
	}
	dst := map[string][]answer{
		"zfs get -H -o value guid BACKUP/libvirt":                           {{stdout: "7691008105353218483\n"}},
		"zfs get -Hp -o property,value receive_resume_token BACKUP/libvirt": {{stdout: "receive_resume_token\t" + token + "\n"}},
		"zfs receive -s BACKUP/libvirt":                                     {{exit: 255, stderr: "client_loop: send disconnect: Broken pipe\n"}},
		"zfs receive -A BACKUP/libvirt":                                     {{}},
	}
	r, _, d := openzfsPair(src, dst)
	_, err := r.Run(context.Background())
	if err == nil || !strings.Contains(err.Error(), "resume the interrupted receive into BACKUP/libvirt") {
		t.Fatalf("a failed resume: %v", err)
	}
	if got := d.ran("zfs receive -A"); len(got) != 0 {
		t.Errorf("aborted a partial receive that can still be resumed: %q", got)
	}
}
