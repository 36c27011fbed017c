package backup

import (
	"context"
	"log/slog"

	"github.com/vmhistory/vmhistory/config"
)

// kopiaUploader adapts a kopiarepo.Repo to the upload step.
type kopiaUploader struct {
	Uploader
	closeFn func(context.Context) error
}

func (k *kopiaUploader) Close(ctx context.Context) error { return k.closeFn(ctx) }

func openKopiaUploader(ctx context.Context, cfg *config.Config, log *slog.Logger) (*kopiaUploader, error) {
	return nil, errNotYet
}
