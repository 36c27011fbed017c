package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"slices"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/restore"
)

type timelineFlags struct {
	dataset string
}

func newTimelineCommand(opts *globalOptions) *cobra.Command {
	flags := &timelineFlags{}
	cmd := &cobra.Command{
		Use:   "timeline",
		Short: "List every snapshot that exists anywhere: local ZFS, the replica, kopia",
		Long: `List every snapshot of the configured datasets that exists anywhere, one
line per snapshot, oldest first, with where it can be read from:

  LOCAL    a ZFS snapshot on this host (fastest)
  REPLICA  a ZFS snapshot on the replica (a second pool, or over ssh)
  KOPIA    a snapshot in the kopia repository (slowest; read with prefetch)

Snapshots are matched by their ZFS guid, which survives zfs send/receive
and which every kopia upload carries as a tag: one line is the same bytes
wherever it is read. REFERENCED is the bytes the ZFS snapshot references
(zfs list's REFER: after compression, holes not counted), the same for a
snapshot wherever it lives: a kopia upload records it. An upload made by
a vmhistory older than that shows "-" once the ZFS snapshot is gone.

A source that cannot be reached (the replica is offline, the repository's
password file is missing or readable by others, the kopia config is not
created yet) is named in a warning on stderr; the others still show, and
the exit status is 0 as long as one source answered. The kopia password is
$KOPIA_PASSWORD when set (it wins over kopia.password_file, as in kopia's
CLI), else the content of kopia.password_file.

` + restore.SpecHelp,
		Example: `  vmhistory timeline
  vmhistory timeline --dataset DATA/libvirt
  vmhistory timeline --json | jq '.[] | select(.sources | length == 1)'
  vmhistory timeline ls latest
  vmhistory timeline ls latest~3:images
  vmhistory timeline ls DATA/libvirt@2023-03-04_05:00:01:images`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runTimeline(cmd, opts, flags)
		},
	}
	cmd.PersistentFlags().StringVarP(&flags.dataset, "dataset", "d", "", "only this dataset (e.g. DATA/libvirt); needed by latest and dates when several datasets are configured")
	cmd.AddCommand(&cobra.Command{
		Use:   "ls SNAPSHOT[:PATH]",
		Short: "List a directory of a snapshot, read from the fastest source that has it",
		Long: `List a directory of a snapshot, read from the fastest source that has it.
Symbolic links are shown with their target and never followed.

` + restore.SpecHelp,
		Example: `  vmhistory timeline ls latest
  vmhistory timeline ls 2023-03-04:images
  vmhistory timeline ls DATA/libvirt@latest~2:images --json`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runTimelineLs(cmd, opts, flags, args[0])
		},
	})
	return cmd
}

// openSession opens the sources of cfg and builds their timeline,
// warning on stderr about each source that could not be opened or listed.
// so sets what the command's flags say (the prefetch window, seeding);
// the logger and the start are the command's.
func openSession(ctx context.Context, cmd *cobra.Command, opts *globalOptions, cfg *config.Config, so restore.SessionOptions) (*restore.Session, error) {
	so.Logger, so.Start = slog.Default(), opts.started
	sess, err := restore.Open(ctx, cfg, so)
	if err != nil {
		return nil, err
	}
	for _, p := range slices.Concat(sess.Unavailable(), sess.Unlisted()) {
		fmt.Fprintf(cmd.ErrOrStderr(), "vmhistory: warning: %s\n", oneLineErr(p))
	}
	return sess, nil
}

// openTimeline loads the configuration and opens a session on it,
// failing only when no source answered.
func openTimeline(ctx context.Context, cmd *cobra.Command, opts *globalOptions) (*restore.Session, error) {
	cfg, err := loadConfig(cmd, opts)
	if err != nil {
		return nil, err
	}
	sess, err := openSession(ctx, cmd, opts, cfg, restore.SessionOptions{})
	if err != nil {
		return nil, err
	}
	if sess.NoneAnswered() {
		sess.Close()
		return nil, errNoSourceAnswered
	}
	// What is printed must be the repository as it is, not as this host
	// last saw it (the open may have been answered from that).
	if _, err := sess.CheckOpen(ctx); err != nil {
		fmt.Fprintf(cmd.ErrOrStderr(), "vmhistory: warning: %s\n", oneLineErr(err))
	}
	return sess, nil
}

var errNoSourceAnswered = errors.New("no snapshot source answered")

func oneLineErr(err error) string { return strings.Join(strings.Fields(err.Error()), " ") }

func runTimeline(cmd *cobra.Command, opts *globalOptions, flags *timelineFlags) error {
	ctx, stop := interruptContext(cmd.Context())
	defer stop()
	sess, err := openTimeline(ctx, cmd, opts)
	if err != nil {
		return err
	}
	defer sess.Close()
	tl := sess.Timeline().Filter(flags.dataset)
	if opts.jsonOutput {
		entries := tl.Entries
		if entries == nil {
			entries = []*restore.Entry{}
		}
		return writeIndentedJSON(cmd.OutOrStdout(), entries)
	}
	writeTimelineTable(cmd.OutOrStdout(), tl)
	return nil
}

// writeTimelineTable prints one line per snapshot; the dataset is shown
// only when there are several.
func writeTimelineTable(w io.Writer, tl *restore.Timeline) {
	if len(tl.Entries) == 0 {
		fmt.Fprintln(w, "no snapshots")
		return
	}
	several := len(tl.Datasets()) > 1
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "SNAPSHOT\tTIME\tLOCAL\tREPLICA\tKOPIA\tREFERENCED")
	mark := func(ok bool) string {
		if ok {
			return "✓"
		}
		return "-"
	}
	for _, e := range tl.Entries {
		name := e.Name
		if several {
			name = e.FullName()
		}
		size := "-"
		if n := e.Size(); n > 0 {
			size = tlBytes(n)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", name, e.Time.Local().Format("2006-01-02 15:04:05"),
			mark(e.Has(restore.KindLocal)), mark(e.Has(restore.KindReplica)), mark(e.Has(restore.KindKopia)), size)
	}
	tw.Flush()
}

func runTimelineLs(cmd *cobra.Command, opts *globalOptions, flags *timelineFlags, spec string) error {
	ctx, stop := interruptContext(cmd.Context())
	defer stop()
	sess, err := openTimeline(ctx, cmd, opts)
	if err != nil {
		return err
	}
	defer sess.Close()
	entry, rel, err := sess.Resolve(spec, flags.dataset)
	if err != nil {
		return err
	}
	st, err := sess.Stat(ctx, entry, rel)
	if err != nil {
		return err
	}
	list := []restore.FileInfo{st}
	if st.Mode.IsDir() {
		if list, err = sess.ReadDir(ctx, entry, rel); err != nil {
			return err
		}
	}
	sort.Slice(list, func(i, j int) bool { return list[i].Name < list[j].Name })
	if opts.jsonOutput {
		return writeIndentedJSON(cmd.OutOrStdout(), list)
	}
	tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 0, 2, ' ', 0)
	for _, fi := range list {
		name := fi.Name
		switch {
		case fi.Mode&fs.ModeSymlink != 0:
			name += " -> " + fi.Target
		case fi.Mode.IsDir():
			name += "/"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", fi.Mode, tlBytes(fi.Size), fi.ModTime.Local().Format(time.DateTime), name)
	}
	return tw.Flush()
}

// tlBytes renders a size in binary units.
func tlBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
