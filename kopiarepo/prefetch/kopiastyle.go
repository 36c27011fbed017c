package prefetch

import (
	"context"
	"fmt"
	"io"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/object"
)

// KopiaStyleBufferSize is the buffer CopyKopiaStyle copies with.
const KopiaStyleBufferSize = 1 << 20

// CopyKopiaStyle copies object oid to w the way "kopia mount" + cp (and
// "kopia restore") read a file: kopia's object reader from
// repo.OpenObject, io.CopyBuffer with a 1 MiB buffer. The object reader
// fetches one chunk at a time, each when the copy reaches it. This is the
// reference the prefetching Reader is measured against.
func CopyKopiaStyle(ctx context.Context, rep repo.Repository, oid object.ID, w io.Writer) (int64, error) {
	r, err := rep.OpenObject(ctx, oid)
	if err != nil {
		return 0, fmt.Errorf("open kopia object %v: %w", oid, err)
	}
	defer r.Close() //nolint:errcheck
	// Hide any ReaderFrom/WriterTo so that the copy goes through the
	// 1 MiB buffer, as cp's read/write loop does.
	return io.CopyBuffer(struct{ io.Writer }{w}, struct{ io.Reader }{r}, make([]byte, KopiaStyleBufferSize))
}
