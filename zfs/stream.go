package zfs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"sync/atomic"
	"syscall"

	"github.com/vmhistory/vmhistory/runner"
)

// SendOptions select what `zfs send` streams.
type SendOptions struct {
	// Snapshot is the full name of the snapshot to send.
	Snapshot string
	// From, when set, makes the stream incremental from this earlier
	// snapshot of the same dataset (full name or @name).
	From string
	// Intermediate sends every snapshot between From and Snapshot (-I),
	// so the receiving side keeps the same history; without it only the
	// difference arrives, as Snapshot alone (-i).
	Intermediate bool
	// ResumeToken, when set, resumes an interrupted receive instead
	// (OpenZFS only); Snapshot and From are then ignored.
	ResumeToken string
	// Raw sends encrypted datasets as they are on disk (OpenZFS only).
	Raw bool
}

func (z *ZFS) sendArgs(ctx context.Context, o SendOptions) ([]string, error) {
	args := []string{z.opts.Binary, "send"}
	if o.ResumeToken != "" || o.Raw {
		f, err := z.Features(ctx)
		if err != nil {
			return nil, err
		}
		if o.ResumeToken != "" && !f.ResumableReceive {
			return nil, fmt.Errorf("send with resume token on %s: %w", z.Where(), ErrNotSupported)
		}
		if o.Raw && !f.RawSend {
			return nil, fmt.Errorf("raw send on %s: %w", z.Where(), ErrNotSupported)
		}
	}
	if o.ResumeToken != "" {
		return append(args, "-t", o.ResumeToken), nil
	}
	if err := ValidateSnapshotName(o.Snapshot); err != nil {
		return nil, err
	}
	if o.Raw {
		args = append(args, "-w")
	}
	if o.From != "" {
		if o.Intermediate {
			args = append(args, "-I", o.From)
		} else {
			args = append(args, "-i", o.From)
		}
	}
	return append(args, o.Snapshot), nil
}

// Send streams a snapshot (or the increment from o.From) into w.
func (z *ZFS) Send(ctx context.Context, o SendOptions, w io.Writer) error {
	args, err := z.sendArgs(ctx, o)
	if err != nil {
		return err
	}
	if _, err := z.run.Run(ctx, runner.Cmd{Args: args, Stdout: w, Timeout: z.opts.StreamTimeout}); err != nil {
		return fmt.Errorf("send %s on %s: %w", describeSend(o), z.Where(), classify(err))
	}
	return nil
}

func describeSend(o SendOptions) string {
	switch {
	case o.ResumeToken != "":
		return "(resume token)"
	case o.From != "":
		return o.From + " -> " + o.Snapshot
	default:
		return o.Snapshot
	}
}

// ReceiveOptions tune `zfs receive`.
type ReceiveOptions struct {
	// Force (-F) rolls the destination back to its newest snapshot and
	// destroys snapshots the stream does not have. vmhistory uses it only
	// on an explicit request: a replica that diverged is reported instead.
	Force bool
	// Resumable (-s) keeps a partial receive for resuming where the
	// platform supports it; elsewhere it is ignored.
	Resumable bool
}

// Receive reads a send stream from r into dataset.
func (z *ZFS) Receive(ctx context.Context, dataset string, r io.Reader, o ReceiveOptions) error {
	if err := ValidateDatasetName(dataset); err != nil {
		return err
	}
	args := []string{z.opts.Binary, "receive"}
	if o.Force {
		args = append(args, "-F")
	}
	if o.Resumable {
		f, err := z.Features(ctx)
		if err != nil {
			return err
		}
		if f.ResumableReceive {
			args = append(args, "-s")
		} else {
			z.log.Debug("receive: this zfs cannot resume receives; receiving without -s", "where", z.Where())
		}
	}
	args = append(args, dataset)
	if _, err := z.run.Run(ctx, runner.Cmd{Args: args, Stdin: r, Timeout: z.opts.StreamTimeout}); err != nil {
		return fmt.Errorf("receive into %s on %s: %w", dataset, z.Where(), classify(err))
	}
	return nil
}

// ResumeToken returns the receive_resume_token of a dataset whose receive
// was interrupted, or "" when there is none. Legacy zfs cannot resume: the
// error matches ErrNotSupported.
func (z *ZFS) ResumeToken(ctx context.Context, dataset string) (string, error) {
	f, err := z.Features(ctx)
	if err != nil {
		return "", err
	}
	if !f.ResumableReceive {
		return "", fmt.Errorf("resume token of %s on %s: %w", dataset, z.Where(), ErrNotSupported)
	}
	values, err := z.Get(ctx, dataset, "receive_resume_token")
	if err != nil {
		return "", err
	}
	if tok := values["receive_resume_token"]; tok != "-" {
		return tok, nil
	}
	return "", nil
}

// AbortReceive discards the partial state of an interrupted resumable
// receive into dataset (`zfs receive -A`), so that a new stream can land.
// The data of that partial receive is lost; the dataset's snapshots are
// not touched. Legacy zfs has no partial receives: ErrNotSupported.
func (z *ZFS) AbortReceive(ctx context.Context, dataset string) error {
	if err := ValidateDatasetName(dataset); err != nil {
		return err
	}
	f, err := z.Features(ctx)
	if err != nil {
		return err
	}
	if !f.ResumableReceive {
		return fmt.Errorf("abort the interrupted receive into %s on %s: %w", dataset, z.Where(), ErrNotSupported)
	}
	if _, err := z.zfs(ctx, "receive", "-A", dataset); err != nil {
		return fmt.Errorf("abort the interrupted receive into %s on %s: %w", dataset, z.Where(), err)
	}
	return nil
}

// Transfer pipes a send on src into a receive on dst — either side may be
// local or over ssh — and returns the bytes of the stream. If either side
// fails the other is stopped, and the error of the side that failed first is
// returned.
func Transfer(ctx context.Context, src *ZFS, send SendOptions, dst *ZFS, dataset string, recv ReceiveOptions) (int64, error) {
	return TransferObserved(ctx, src, send, dst, dataset, recv, nil)
}

// TransferObserved is Transfer that also hands every byte of the stream,
// as it passes, to observe (a StreamParser): one read of the change for
// the replica and the kopia upload. observe cannot slow or fail the
// transfer by an error; its Write is called on the send's goroutine.
func TransferObserved(ctx context.Context, src *ZFS, send SendOptions, dst *ZFS, dataset string, recv ReceiveOptions, observe io.Writer) (int64, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	pr, pw := io.Pipe()
	counter := &countingWriter{w: pw, observe: observe}

	sendErr := make(chan error, 1)
	go func() {
		err := src.Send(ctx, send, counter)
		if err != nil {
			pw.CloseWithError(err)
			cancel() // a truncated stream would only make receive fail later
		} else {
			pw.Close()
		}
		sendErr <- err
	}()
	recvErr := dst.Receive(ctx, dataset, pr, recv)
	// receive has stopped reading; unblock a send still writing.
	pr.CloseWithError(errors.New("receive ended"))
	if recvErr != nil {
		cancel()
	}
	serr := <-sendErr
	switch {
	case serr != nil && !isCancel(serr) && !(recvErr != nil && isBrokenPipe(serr)):
		return counter.n.Load(), serr
	case recvErr != nil:
		return counter.n.Load(), recvErr
	case serr != nil:
		return counter.n.Load(), serr
	}
	return counter.n.Load(), nil
}

// isBrokenPipe reports whether a send failed writing to a stream nobody
// reads any more: the receive ended first (zfs send says "Broken pipe").
func isBrokenPipe(err error) bool {
	return errors.Is(err, syscall.EPIPE) || strings.Contains(strings.ToLower(err.Error()), "broken pipe")
}

func isCancel(err error) bool {
	return errors.Is(err, context.Canceled) || strings.Contains(err.Error(), "receive ended")
}

type countingWriter struct {
	w       io.Writer
	observe io.Writer
	n       atomic.Int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n.Add(int64(n))
	if c.observe != nil && n > 0 {
		c.observe.Write(p[:n]) //nolint:errcheck // an observer's trouble is its own
	}
	return n, err
}
