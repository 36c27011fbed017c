package backup

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/virt"
	"github.com/vmhistory/vmhistory/zfs"
)

// Open builds a pipeline from the configuration: zfs here and on the
// replica, libvirt, kopia. What cannot be reached is not an error here: the
// step that needs it fails and is named in the report, while the others
// still run (a replica that is down must not stop the snapshot).
func Open(ctx context.Context, cfg *config.Config, log *slog.Logger) (*Pipeline, []error) {
	if log == nil {
		log = slog.Default()
	}
	p := &Pipeline{Config: cfg, Log: log}
	var problems []error
	local, replica, closeReplica, err := zfs.Configured(cfg, log)
	if err != nil {
		problems = append(problems, fmt.Errorf("replica: %w", err))
	}
	p.Local, p.Replica = local, replica
	p.closers = append(p.closers, closeReplica)

	// Mode none quiesces nothing but still keeps the VMs' definitions in
	// every snapshot.
	conn, err := virt.Dial(ctx, cfg.Libvirt.Socket, cfg.Libvirt.URI)
	if err != nil {
		problems = append(problems, fmt.Errorf("libvirt: %w", err))
	} else {
		p.Virt = conn
		p.closers = append(p.closers, conn.Close)
	}

	if cfg.Kopia != nil {
		up, err := openKopiaUploader(ctx, cfg, log)
		if err != nil {
			// Not a problem to warn about here: the upload step fails with
			// it (or, when it is skipped, prune says why it keeps
			// everything), and one error is printed once.
			p.Uploader = &unavailableUploader{err: err}
		} else {
			p.Uploader = up
			p.closers = append(p.closers, func() error { return up.Close(context.Background()) })
		}
	}
	return p, problems
}

// Close releases the connections Open made.
func (p *Pipeline) Close() error {
	var errs []error
	for i := len(p.closers) - 1; i >= 0; i-- {
		errs = append(errs, p.closers[i]())
	}
	p.closers = nil
	return errors.Join(errs...)
}

// unavailableUploader stands for a repository that could not be opened, so
// the upload step fails with that reason (and pruning keeps what it would
// have needed to know about) while the other steps run.
type unavailableUploader struct{ err error }

func (u *unavailableUploader) Uploaded(context.Context, string) (map[uint64]bool, error) {
	return nil, fmt.Errorf("kopia repository unavailable: %w", u.err)
}

func (u *unavailableUploader) Upload(context.Context, UploadJob) (UploadStats, error) {
	return UploadStats{}, fmt.Errorf("kopia repository unavailable: %w", u.err)
}

func (u *unavailableUploader) Finish(context.Context) error { return nil }
