package restore

import (
	"context"
	"fmt"
	"log/slog"
	"sync"

	"github.com/pkg/sftp"

	"github.com/vmhistory/vmhistory/runner"
)

// sftpConn is one sftp session over `ssh -s sftp`.
type sftpConn struct {
	client *sftp.Client
	cancel context.CancelFunc
	done   chan struct{} // closed when the session ended
	once   sync.Once
	wait   func() error
}

// dialSFTP starts the sftp subsystem through r. ctx bounds the start only;
// the session lives until close.
func dialSFTP(ctx context.Context, r *runner.SSH, log *slog.Logger) (*sftpConn, error) {
	life, cancel := context.WithCancel(context.Background())
	stdin, stdout, wait, err := r.StartSubsystem(life, "sftp")
	if err != nil {
		cancel()
		return nil, err
	}
	stop := context.AfterFunc(ctx, cancel) // a start abandoned by the caller
	client, err := sftp.NewClientPipe(stdout, stdin, sftp.UseConcurrentReads(true))
	stop()
	if err != nil {
		cancel()
		werr := wait()
		if werr != nil {
			return nil, fmt.Errorf("sftp session on %s: %w", r.Where(), werr)
		}
		return nil, fmt.Errorf("sftp session on %s: %w", r.Where(), err)
	}
	c := &sftpConn{client: client, cancel: cancel, done: make(chan struct{}), wait: wait}
	go func() {
		err := client.Wait()
		log.Debug("sftp session ended", "where", r.Where(), "err", err)
		close(c.done)
	}()
	return c, nil
}

func (c *sftpConn) alive() bool {
	select {
	case <-c.done:
		return false
	default:
		return true
	}
}

func (c *sftpConn) close() {
	c.once.Do(func() {
		c.client.Close()
		c.cancel()
		c.wait() //nolint:errcheck // ended on purpose
	})
}
