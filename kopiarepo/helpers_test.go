package kopiarepo_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/kopiarepo"
)

const (
	testPassword = "correct horse battery staple"
	testHost     = "kvmtest"
	testUser     = "root"
	// testSource is the "dataset mountpoint" recorded as the kopia source;
	// the files are read from elsewhere, as from a ZFS snapshot.
	testSource = "/var/lib/libvirt"
)

// testConnect are the connection options of every test repository: the
// cache in the test's temp dir, never in root's ~/.cache.
func testConnect(t testing.TB) kopiarepo.ConnectOptions {
	return kopiarepo.ConnectOptions{Host: testHost, User: testUser, CacheDirectory: filepath.Join(t.TempDir(), "cache")}
}

// newRepo creates a repository in spec and opens it; it is closed at cleanup.
func newRepo(t testing.TB, spec kopiarepo.StorageSpec) (*kopiarepo.Repo, string) {
	t.Helper()
	ctx := context.Background()
	configFile := filepath.Join(t.TempDir(), "kopia.config")
	if err := kopiarepo.Create(ctx, spec, configFile, testPassword, kopiarepo.CreateOptions{ConnectOptions: testConnect(t)}); err != nil {
		t.Fatalf("Create: %v", err)
	}
	r, err := kopiarepo.Open(ctx, configFile, testPassword)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { r.Close(context.Background()) })
	return r, configFile
}

// VM-like data: 64 KiB blocks that are each all zero (a sparse region),
// random (compressed or encrypted data), or text-like (compressible),
// in proportions typical of a VM disk image.
const vmBlock = 64 << 10

// writeVMImage writes size bytes of VM-like data to path, deterministic
// for a seed.
func writeVMImage(t testing.TB, path string, size int64, seed uint64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	rng := rand.New(rand.NewChaCha8(seedBytes(seed)))
	buf := make([]byte, vmBlock)
	for off := int64(0); off < size; off += vmBlock {
		n := min(int64(vmBlock), size-off)
		fillVMBlock(rng, buf[:n])
		if _, err := f.Write(buf[:n]); err != nil {
			t.Fatal(err)
		}
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

func seedBytes(seed uint64) [32]byte {
	var s [32]byte
	binary.LittleEndian.PutUint64(s[:], seed)
	return s
}

var words = strings.Fields(`the quick brown fox jumps over lazy dog kernel
systemd journal started session user root login libvirt qemu block device
sector inode ext4 mount filesystem error warning info debug package update`)

func fillVMBlock(rng *rand.Rand, b []byte) {
	switch k := rng.IntN(10); {
	case k < 3: // zero
		clear(b)
	case k < 6: // random
		for i := 0; i+8 <= len(b); i += 8 {
			binary.LittleEndian.PutUint64(b[i:], rng.Uint64())
		}
		for i := len(b) &^ 7; i < len(b); i++ {
			b[i] = byte(rng.Uint32())
		}
	default: // text-like, compressible
		i := 0
		for i < len(b) {
			w := words[rng.IntN(len(words))]
			i += copy(b[i:], w)
			if i < len(b) {
				b[i] = " \n"[rng.IntN(2)]
				i++
			}
		}
	}
}

// writeTree writes a small VM dataset: two VMs with disks and XML, a
// nested directory, an empty file and a symlink. About 6 MiB.
func writeTree(t testing.TB, dir string) {
	t.Helper()
	mkdir := func(p string) {
		if err := os.MkdirAll(filepath.Join(dir, p), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	write := func(p, content string) {
		if err := os.WriteFile(filepath.Join(dir, p), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	mkdir("images")
	mkdir("qemu/save")
	mkdir("etc/nested/deeper")
	writeVMImage(t, filepath.Join(dir, "images/web.raw"), 4<<20, 1)
	writeVMImage(t, filepath.Join(dir, "images/db.qcow2"), 2<<20+12345, 2)
	write("qemu/web.xml", "<domain type='kvm'><name>web</name></domain>\n")
	write("qemu/db.xml", "<domain type='kvm'><name>db</name></domain>\n")
	write("qemu/save/.keep", "")
	write("etc/nested/deeper/notes.txt", strings.Repeat("vmhistory test tree\n", 100))
	if err := os.Chmod(filepath.Join(dir, "images/db.qcow2"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../images/web.raw", filepath.Join(dir, "qemu/web-disk")); err != nil {
		t.Fatal(err)
	}
}

// rewriteRange overwrites length bytes of path at off with fresh random
// data, as a VM writing to its disk, and moves the mtime on.
func rewriteRange(t testing.TB, path string, off, length int64, seed uint64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, length)
	rng := rand.New(rand.NewChaCha8(seedBytes(seed)))
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	later := time.Now().Add(time.Second)
	if err := os.Chtimes(path, later, later); err != nil {
		t.Fatal(err)
	}
}

// treeDigest maps every regular file of dir (slash-separated relative
// path) to its SHA-256.
func treeDigest(t testing.TB, dir string) map[string][32]byte {
	t.Helper()
	out := map[string][32]byte{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		out[filepath.ToSlash(rel)] = sha256.Sum256(data)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// checkSnapshotFiles reads every file of want back from the snapshot and
// compares bytes, size and mode with the tree in dir.
func checkSnapshotFiles(t testing.TB, r *kopiarepo.Repo, snapID, dir string) {
	t.Helper()
	ctx := context.Background()
	want := treeDigest(t, dir)
	names := make([]string, 0, len(want))
	for n := range want {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		f, err := r.OpenFile(ctx, snapID, name)
		if err != nil {
			t.Errorf("OpenFile %s: %v", name, err)
			continue
		}
		h := sha256.New()
		n, err := io.Copy(h, f)
		f.Close()
		if err != nil {
			t.Errorf("read %s: %v", name, err)
			continue
		}
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		var got [32]byte
		copy(got[:], h.Sum(nil))
		if got != want[name] || n != fi.Size() || f.Size != fi.Size() {
			t.Errorf("%s read back differs: %d bytes (size %d), want %d", name, n, f.Size, fi.Size())
		}
		if f.Mode.Perm() != fi.Mode().Perm() {
			t.Errorf("%s mode %v, want %v", name, f.Mode, fi.Mode())
		}
	}
}

// kopiaCLI builds the kopia CLI from the module vmhistory links (the same
// version as the library) once per test binary, or returns the one named
// by $VMHISTORY_KOPIA_CLI. The first build of the day takes a minute or
// two; later ones come from Go's build cache in seconds.
var kopiaCLI = sync.OnceValues(func() (string, error) {
	if p := os.Getenv("VMHISTORY_KOPIA_CLI"); p != "" {
		return p, nil
	}
	dir, err := os.MkdirTemp("", "vmhistory-kopia-cli-")
	if err != nil {
		return "", err
	}
	cliDirs = append(cliDirs, dir)
	bin := filepath.Join(dir, "kopia")
	cmd := exec.Command(goTool(), "build", "-o", bin, "github.com/kopia/kopia")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("go build github.com/kopia/kopia: %v\n%s", err, out.String())
	}
	return bin, nil
})

var cliDirs []string

func TestMain(m *testing.M) {
	code := m.Run()
	for _, d := range cliDirs {
		os.RemoveAll(d)
	}
	os.Exit(code)
}

func goTool() string {
	if p := filepath.Join(runtime.GOROOT(), "bin", "go"); fileExists(p) {
		return p
	}
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return "/usr/local/go/bin/go"
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// runKopia runs the kopia CLI against configFile with the test password in
// KOPIA_PASSWORD, and returns its stdout.
func runKopia(t testing.TB, configFile string, args ...string) string {
	t.Helper()
	bin, err := kopiaCLI()
	if err != nil {
		t.Fatalf("build the kopia CLI: %v", err)
	}
	cmd := exec.Command(bin, kopiaArgs(t, configFile, args...)...)
	cmd.Env = kopiaEnv()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("kopia %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// kopiaArgs are the kopia CLI's arguments for configFile: no progress
// output, logs in the test's temp dir instead of root's ~/.cache.
func kopiaArgs(t testing.TB, configFile string, args ...string) []string {
	return append([]string{"--config-file=" + configFile, "--no-progress", "--log-dir=" + t.TempDir()}, args...)
}

func kopiaEnv() []string {
	return append(os.Environ(), "KOPIA_PASSWORD="+testPassword, "KOPIA_CHECK_FOR_UPDATES=false", "KOPIA_PERSIST_CREDENTIALS_ON_CONNECT=false")
}
