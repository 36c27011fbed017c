package backup

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"

	"github.com/vmhistory/vmhistory/safefile"
)

// Step names, as they appear in reports, logs and metrics.
const (
	StepLock        = "lock"
	StepRecover     = "recover"
	StepDefinitions = "definitions"
	StepQuiesce     = "quiesce"
	StepSnapshot    = "snapshot"
	StepResume      = "resume"
	StepReplicate   = "replicate"
	StepUpload      = "upload"
	StepPrune       = "prune"
)

// Status of a step.
const (
	StatusOK      = "ok"
	StatusFailed  = "failed"
	StatusSkipped = "skipped"
	StatusWarning = "warning"
)

// StepResult is one step of one run, for one dataset where it applies.
type StepResult struct {
	Step     string        `json:"step"`
	Dataset  string        `json:"dataset,omitempty"`
	Status   string        `json:"status"`
	Duration time.Duration `json:"duration_ns"`
	Bytes    int64         `json:"bytes,omitempty"`
	// Read are the bytes the step read from the dataset (upload).
	Read int64 `json:"read_bytes,omitempty"`
	// FilesByWay counts the upload's files by the way they went:
	// "stream" (only the changed chunks read), "unchanged", "full".
	FilesByWay map[string]int `json:"files_by_way,omitempty"`
	// UploadFiles are the files an upload from the ZFS stream read: on
	// the stream path or, and why, in full.
	UploadFiles []UploadFile `json:"upload_files,omitempty"`
	Detail      string       `json:"detail,omitempty"`
	Error       string       `json:"error,omitempty"`
}

// UploadFile is one file an upload read.
type UploadFile struct {
	Snapshot string `json:"snapshot"`
	Path     string `json:"path"`
	Way      string `json:"way"`
	Reason   string `json:"reason,omitempty"`
	// From is the file's path in the stream's base when it was renamed.
	From      string `json:"from,omitempty"`
	ReadBytes int64  `json:"read_bytes"`
}

// VMResult is what the run did to one VM.
type VMResult struct {
	Name     string        `json:"name"`
	Mode     string        `json:"mode"`
	Downtime time.Duration `json:"downtime_ns"`
	Resumed  bool          `json:"resumed"`
	// Action says how it was brought back ("started from its managed-save
	// image, its guest agent answering 3.1s after it was stopped").
	Action string `json:"action,omitempty"`
	Error  string `json:"error,omitempty"`
}

// SnapshotResult is a snapshot the run took.
type SnapshotResult struct {
	Dataset  string    `json:"dataset"`
	Name     string    `json:"name"`
	GUID     uint64    `json:"guid,string"`
	Creation time.Time `json:"creation"`
	// Atomic says whether the snapshot was taken in one command with the
	// other datasets' (zfs snapshot -r on a common parent).
	Atomic bool `json:"atomic"`
}

// Report is the account of one run: text for the admin, JSON for scripts,
// a Prometheus textfile for node_exporter.
type Report struct {
	RunID     string           `json:"run_id"`
	Host      string           `json:"host"`
	DryRun    bool             `json:"dry_run,omitempty"`
	Started   time.Time        `json:"started"`
	Finished  time.Time        `json:"finished"`
	Steps     []StepResult     `json:"steps"`
	VMs       []VMResult       `json:"vms"`
	Snapshots []SnapshotResult `json:"snapshots"`
	Warnings  []string         `json:"warnings,omitempty"`
	Plan      []string         `json:"plan,omitempty"`
	Success   bool             `json:"success"`
	// Failure names the first failed step and its cause.
	Failure string `json:"failure,omitempty"`
}

// Add records a step result.
func (r *Report) Add(s StepResult) { r.Steps = append(r.Steps, s) }

// Warn records a warning.
func (r *Report) Warn(format string, args ...any) {
	r.Warnings = append(r.Warnings, fmt.Sprintf(format, args...))
}

// Failed reports whether any step failed.
func (r *Report) Failed() bool {
	for _, s := range r.Steps {
		if s.Status == StatusFailed {
			return true
		}
	}
	for _, vm := range r.VMs {
		if vm.Error != "" {
			return true
		}
	}
	return false
}

// Err is the run's failure as an error, nil when every step succeeded.
func (r *Report) Err() error {
	var errs []error
	for _, s := range r.Steps {
		if s.Status == StatusFailed {
			where := s.Step
			if s.Dataset != "" {
				where += " " + s.Dataset
			}
			errs = append(errs, fmt.Errorf("%s: %s", where, s.Error))
		}
	}
	for _, vm := range r.VMs {
		if vm.Error != "" {
			errs = append(errs, fmt.Errorf("vm %s: %s", vm.Name, vm.Error))
		}
	}
	return errors.Join(errs...)
}

// FailedNames names what failed, without the errors: "replicate
// DATA/libvirt", "vm web".
func (r *Report) FailedNames() []string {
	var names []string
	for _, s := range r.Steps {
		if s.Status == StatusFailed {
			names = append(names, strings.TrimSpace(s.Step+" "+s.Dataset))
		}
	}
	for _, vm := range r.VMs {
		if vm.Error != "" {
			names = append(names, "vm "+vm.Name)
		}
	}
	return names
}

// BytesFor sums the bytes of one step over datasets.
func (r *Report) BytesFor(step string) int64 {
	var n int64
	for _, s := range r.Steps {
		if s.Step == step {
			n += s.Bytes
		}
	}
	return n
}

// finish fills the summary fields.
func (r *Report) finish() {
	r.Finished = time.Now().UTC()
	r.Success = !r.Failed()
	if err := r.Err(); err != nil {
		r.Failure = strings.SplitN(err.Error(), "\n", 2)[0]
	}
}

// WriteJSON prints the report as indented JSON.
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	// Lists are [] when empty, never null: jq '.steps[]' must not fail on
	// a dry run.
	out := *r
	out.Steps = nonNil(out.Steps)
	out.VMs = nonNil(out.VMs)
	out.Snapshots = nonNil(out.Snapshots)
	return enc.Encode(&out)
}

func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

// WriteText prints the report for a person.
func (r *Report) WriteText(w io.Writer) error {
	if r.DryRun {
		fmt.Fprintln(w, "Dry run: nothing was changed. The plan:")
		for i, p := range r.Plan {
			fmt.Fprintf(w, "  %d. %s\n", i+1, p)
		}
		for _, s := range r.Steps {
			if s.Status == StatusFailed {
				fmt.Fprintf(w, "Cannot plan the %s step: %s\n", s.Step, s.Error)
			}
		}
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "STEP\tDATASET\tSTATUS\tTIME\tBYTES\tDETAIL")
	for _, s := range r.Steps {
		detail := s.Detail
		if s.Error != "" {
			detail = s.Error
		}
		bytes := ""
		if s.Bytes > 0 {
			bytes = humanBytes(s.Bytes)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", s.Step, dash(s.Dataset), s.Status, roundDuration(s.Duration), bytes, detail)
	}
	tw.Flush()
	var files []UploadFile
	for _, s := range r.Steps {
		files = append(files, s.UploadFiles...)
	}
	if len(files) > 0 {
		fmt.Fprintln(w)
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "UPLOADED\tFILE\tWAY\tREAD\tWHY")
		for _, f := range files {
			why := f.Reason
			if f.From != "" && why == "" {
				why = "renamed from " + f.From
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", f.Snapshot, f.Path, f.Way, humanBytes(f.ReadBytes), dash(why))
		}
		tw.Flush()
	}
	if len(r.VMs) > 0 {
		fmt.Fprintln(w)
		tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
		fmt.Fprintln(tw, "VM\tMODE\tDOWNTIME\tRUNNING AGAIN\tDETAIL")
		for _, vm := range r.VMs {
			detail := vm.Action
			if vm.Error != "" {
				detail = "error: " + vm.Error
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", vm.Name, vm.Mode, roundDuration(vm.Downtime), yesNo(vm.Resumed), detail)
		}
		tw.Flush()
	}
	for _, warn := range r.Warnings {
		fmt.Fprintf(w, "warning: %s\n", warn)
	}
	elapsed := r.Finished.Sub(r.Started)
	if r.Success {
		fmt.Fprintf(w, "backup %s succeeded in %s: %s replicated, %s uploaded\n", r.RunID, roundDuration(elapsed),
			humanBytes(r.BytesFor(StepReplicate)), humanBytes(r.BytesFor(StepUpload)))
	} else {
		// The errors are in the tables above; printing them again makes a
		// long one (a replica's stderr) unreadable.
		fmt.Fprintf(w, "backup %s FAILED after %s: %s\n", r.RunID, roundDuration(elapsed), strings.Join(r.FailedNames(), ", "))
	}
	return nil
}

// WriteTextfile writes the run's metrics for node_exporter's textfile
// collector, atomically. The last success time is carried over from the
// previous file when this run failed, so an alert on its age works.
func (r *Report) WriteTextfile(path string, lastSuccess time.Time) error {
	reg := prometheus.NewRegistry()
	gauge := func(name, help string, labels ...string) *prometheus.GaugeVec {
		g := prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: name, Help: help}, labels)
		reg.MustRegister(g)
		return g
	}
	success := 0.0
	if r.Success {
		success = 1
		lastSuccess = r.Finished
	}
	gauge("vmhistory_backup_success", "1 if the last backup run succeeded, else 0.").WithLabelValues().Set(success)
	gauge("vmhistory_backup_last_run_timestamp_seconds", "When the last backup run finished.").WithLabelValues().Set(float64(r.Finished.Unix()))
	if !lastSuccess.IsZero() {
		gauge("vmhistory_backup_last_success_timestamp_seconds", "When the last successful backup run finished.").WithLabelValues().Set(float64(lastSuccess.Unix()))
	}
	gauge("vmhistory_backup_duration_seconds", "Duration of the last backup run.").WithLabelValues().Set(r.Finished.Sub(r.Started).Seconds())
	stepDur := gauge("vmhistory_backup_step_duration_seconds", "Duration of each step of the last run.", "step", "dataset")
	stepOK := gauge("vmhistory_backup_step_success", "1 if the step succeeded in the last run (skipped steps are absent).", "step", "dataset")
	stepBytes := gauge("vmhistory_backup_step_bytes", "Bytes moved by the step in the last run (replicate: send stream; upload: bytes written to kopia).", "step", "dataset")
	readBytes := gauge("vmhistory_backup_upload_read_bytes", "Bytes the last run's upload read from the dataset's snapshots (with the ZFS stream: the changed chunks only).", "dataset")
	filesByWay := gauge("vmhistory_backup_upload_files", "Files of the last run's upload by the way they went: stream (only the changed chunks read), unchanged, full.", "dataset", "way")
	for _, s := range r.Steps {
		if s.Status == StatusSkipped {
			continue
		}
		stepDur.WithLabelValues(s.Step, s.Dataset).Add(s.Duration.Seconds())
		ok := 0.0
		if s.Status != StatusFailed {
			ok = 1
		}
		stepOK.WithLabelValues(s.Step, s.Dataset).Set(ok)
		if s.Bytes > 0 {
			stepBytes.WithLabelValues(s.Step, s.Dataset).Add(float64(s.Bytes))
		}
		if s.Step == StepUpload && s.Dataset != "" {
			readBytes.WithLabelValues(s.Dataset).Add(float64(s.Read))
			for way, n := range s.FilesByWay {
				filesByWay.WithLabelValues(s.Dataset, way).Add(float64(n))
			}
		}
	}
	downtime := gauge("vmhistory_backup_vm_downtime_seconds", "How long each VM was quiesced in the last run.", "vm")
	for _, vm := range r.VMs {
		downtime.WithLabelValues(vm.Name).Set(vm.Downtime.Seconds())
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("metrics textfile: %w", err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		return fmt.Errorf("metrics textfile: %w", err)
	}
	var buf bytes.Buffer
	for _, mf := range mfs {
		if _, err := expfmt.MetricFamilyToText(&buf, mf); err != nil {
			return fmt.Errorf("metrics textfile: %w", err)
		}
	}
	// Readable by node_exporter, which does not run as root; never
	// written through a link planted in its (often shared) directory.
	if err := safefile.WriteFileAtomic(path, buf.Bytes(), 0o644); err != nil {
		return fmt.Errorf("metrics textfile %s: %w", path, err)
	}
	return nil
}

func humanBytes(n int64) string { return humanize.IBytes(uint64(max(n, 0))) }

func roundDuration(d time.Duration) time.Duration {
	switch {
	case d > time.Minute:
		return d.Round(time.Second)
	case d > time.Second:
		return d.Round(10 * time.Millisecond)
	default:
		return d.Round(time.Millisecond)
	}
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "NO"
}

const lastSuccessFile = "last-success"

// RecordOutcome remembers the finish time of a successful run in dir and
// returns the last success time (this run's, or an earlier one's), for the
// metrics textfile.
func RecordOutcome(dir string, r *Report) time.Time {
	path := filepath.Join(dir, lastSuccessFile)
	if r.Success && !r.DryRun {
		err := writeFileAtomic(path, []byte(r.Finished.Format(time.RFC3339)+"\n"), 0o600)
		if err == nil {
			return r.Finished
		}
		slog.Warn("cannot record the last successful run", "err", err)
	}
	data, err := safefile.ReadFile(path)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			slog.Warn("cannot read the last successful run", "err", err)
		}
		return time.Time{}
	}
	t, _ := time.Parse(time.RFC3339, strings.TrimSpace(string(data)))
	return t
}
