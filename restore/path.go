package restore

import (
	"fmt"
	"path"
	"strings"
)

// CleanPath cleans a path inside a snapshot, relative to the snapshot's
// root and slash-separated, and refuses one that could leave the snapshot:
// an absolute path, one that climbs out with "..", or one holding a NUL
// byte. The empty path, ".", and "/"-free names of the root all clean to
// ".". "a/../b" stays inside and cleans to "b".
//
// CleanPath is lexical; a Tree never follows a symbolic link (see Tree), so
// a link pointing outside the snapshot is seen as a link, not crossed.
func CleanPath(p string) (string, error) {
	if strings.IndexByte(p, 0) >= 0 {
		return "", fmt.Errorf("path %q holds a NUL byte", p)
	}
	if p == "" {
		return ".", nil
	}
	if path.IsAbs(p) {
		return "", fmt.Errorf("path %q is absolute: paths are relative to the snapshot's root (write %s)", p, strings.TrimLeft(p, "/"))
	}
	clean := path.Clean(p)
	if clean == ".." || strings.HasPrefix(clean, "../") {
		return "", fmt.Errorf("path %q leaves the snapshot", p)
	}
	return clean, nil
}

// joinRel joins a cleaned relative path to a root directory.
func joinRel(root, rel string) string {
	if rel == "." || rel == "" {
		return root
	}
	return strings.TrimSuffix(root, "/") + "/" + rel
}
