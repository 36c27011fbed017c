package testenv

import (
	"errors"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// WebDAV is a real WebDAV server for one test: "rclone serve webdav" on
// 127.0.0.1 serving a temporary directory, with basic auth. A kopia
// repository on it is a repository on a remote server, reached over HTTP,
// that a test can take away (Stop) and bring back (Start) on the same
// address with the same content.
type WebDAV struct {
	// Dir is the served directory: what the server stores is here.
	Dir string
	// Addr is 127.0.0.1:port, URL the server's root, http://Addr/.
	Addr string
	URL  string
	// Username and Password are the server's basic-auth credentials.
	Username, Password string
	// LogFile is rclone's log.
	LogFile string

	t          testing.TB
	configFile string

	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
}

// StartWebDAV starts a WebDAV server for t and stops it at cleanup. A
// missing rclone fails the test (never skips it): run `make test`, which
// installs the test services.
func StartWebDAV(t testing.TB) *WebDAV {
	t.Helper()
	if _, err := exec.LookPath("rclone"); err != nil {
		t.Fatalf("testenv: rclone not found (%v): the kopia WebDAV tests serve a repository with `rclone serve webdav`; %s", err, setupHint)
	}
	base := t.TempDir()
	w := &WebDAV{
		Dir:        filepath.Join(base, "dav"),
		Username:   "vmhistory",
		Password:   "webdav-test-password",
		LogFile:    filepath.Join(base, "rclone.log"),
		t:          t,
		configFile: filepath.Join(base, "rclone.conf"),
	}
	if err := os.Mkdir(w.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	// An empty rclone config: rclone must not read root's own remotes.
	if err := os.WriteFile(w.configFile, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Stop)
	var lastErr error
	for range 5 { // a free port may be taken before rclone binds it
		w.Addr = net.JoinHostPort("127.0.0.1", strconv.Itoa(webdavFreePort(t)))
		w.URL = "http://" + w.Addr + "/"
		if lastErr = w.start(); lastErr == nil || !errors.Is(lastErr, errPortTaken) {
			break
		}
	}
	if lastErr != nil {
		t.Fatalf("testenv: start rclone serve webdav: %v\nlog:\n%s", lastErr, w.Log())
	}
	return w
}

// Start starts the server again after Stop, on the same address and
// directory. It fails the test if the server does not come up.
func (w *WebDAV) Start() {
	w.t.Helper()
	if err := w.start(); err != nil {
		w.t.Fatalf("testenv: restart rclone serve webdav on %s: %v\nlog:\n%s", w.Addr, err, w.Log())
	}
}

// Stop stops the server; clients then get "connection refused". It is
// safe to call when the server is stopped already.
func (w *WebDAV) Stop() {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.stopLocked()
}

// Running reports whether the server process is running.
func (w *WebDAV) Running() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.cmd == nil {
		return false
	}
	select {
	case <-w.exited:
		return false
	default:
		return true
	}
}

// Log returns rclone's log so far.
func (w *WebDAV) Log() string {
	data, _ := os.ReadFile(w.LogFile)
	return string(data)
}

func (w *WebDAV) start() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.cmd != nil {
		return errors.New("the WebDAV server is running already")
	}
	cmd := exec.Command("rclone", "serve", "webdav", w.Dir,
		"--addr", w.Addr,
		"--user", w.Username, "--pass", w.Password,
		"--config", w.configFile,
		"--log-file", w.LogFile, "--log-level", "NOTICE",
		// Nothing but the server writes to Dir, but a test may look at it
		// or change it behind the server's back: no stale listings.
		"--dir-cache-time", "0s",
	)
	w.cmd = cmd
	err := launch(launchSpec{
		what: "rclone serve webdav on " + w.Addr, cmd: cmd, timeout: 15 * time.Second,
		answers:       w.answers,
		log:           w.Log,
		portTakenText: "address already in use",
		started:       func(exited chan struct{}) { w.exited = exited },
		stop:          w.stopLocked,
	})
	if err != nil {
		w.cmd = nil
	}
	return err
}

// answers reports whether the server serves its root to our credentials.
func (w *WebDAV) answers() bool {
	req, err := http.NewRequest(http.MethodGet, w.URL, nil)
	if err != nil {
		return false
	}
	req.SetBasicAuth(w.Username, w.Password)
	client := &http.Client{Timeout: 2 * time.Second}
	resp, err := client.Do(req)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

func (w *WebDAV) stopLocked() {
	if w.cmd == nil {
		return
	}
	pgid := w.cmd.Process.Pid
	syscall.Kill(-pgid, syscall.SIGTERM)
	select {
	case <-w.exited:
	case <-time.After(10 * time.Second):
		syscall.Kill(-pgid, syscall.SIGKILL)
		<-w.exited
	}
	w.cmd = nil
}

func webdavFreePort(t testing.TB) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatalf("testenv: find a free port: %v", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
