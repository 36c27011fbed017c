package backup

import "errors"

var errNotYet = errors.New("kopia upload: not wired yet")
