package restore

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

// A file of a directory tree read with os calls is a LocalFile whose
// OSFile reads the same bytes; closing the File closes it.
func TestDirFileIsLocal(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "disk.img"), []byte("snapshot bytes"), 0o644); err != nil {
		t.Fatal(err)
	}
	tree := newDirTree(osFS{}, dir, "test")
	f, err := tree.OpenFile(context.Background(), "disk.img")
	if err != nil {
		t.Fatal(err)
	}
	lf, ok := f.(LocalFile)
	if !ok {
		t.Fatalf("%T is not a LocalFile", f)
	}
	osf := lf.OSFile()
	if osf == nil {
		t.Fatal("OSFile of a file read with os calls is nil")
	}
	buf := make([]byte, 8)
	if n, err := osf.ReadAt(buf, 9); err == nil || string(buf[:n]) != "bytes" {
		t.Errorf("ReadAt through OSFile: %q, %v", buf[:n], err)
	}
	f.Close()
	if _, err := osf.ReadAt(buf, 0); err == nil {
		t.Error("OSFile still readable after the File was closed")
	}
	if (&dirFile{r: nil}).OSFile() != nil {
		t.Error("OSFile of a file not read with os calls is not nil")
	}
}
