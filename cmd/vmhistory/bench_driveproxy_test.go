package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vmhistory/vmhistory/testenv"
)

// The command as a script runs it: the URL on the first line of stdout,
// requests through it to a real WebDAV server paced by the model, and on
// SIGTERM the counters, exit status 0.
func TestBenchDriveProxyCommand(t *testing.T) {
	dav := testenv.StartWebDAV(t)
	const latency = 50 * time.Millisecond
	logFile := filepath.Join(t.TempDir(), "requests.log")
	cmd := exec.Command(os.Args[0], "bench", "drive-proxy", "--json", "--upstream", dav.URL,
		"--preset", "none", "--latency", latency.String(), "--stream-rate", "4MiB/s", "--log", logFile)
	cmd.Env = append(os.Environ(), runMainEnv+"=1")
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	out := bufio.NewReader(stdout)
	line, err := out.ReadString('\n')
	if err != nil {
		cmd.Process.Kill()
		t.Fatalf("no URL line: %v\nstderr: %s", err, stderr.String())
	}
	rest := make(chan []byte, 1)
	go func() { b, _ := io.ReadAll(out); rest <- b; exited <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	url := strings.TrimSpace(line)
	if !strings.HasPrefix(url, "http://127.0.0.1:") || !strings.HasSuffix(url, "/") {
		t.Fatalf("first line %q, want http://127.0.0.1:PORT/", line)
	}

	data := bytes.Repeat([]byte("vmhistory"), 100_000) // 900 kB
	do := func(method string, body []byte) []byte {
		t.Helper()
		var r io.Reader
		if body != nil {
			r = bytes.NewReader(body)
		}
		req, _ := http.NewRequest(method, url+"f", r)
		req.SetBasicAuth(dav.Username, dav.Password)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		got, _ := io.ReadAll(resp.Body)
		if resp.StatusCode/100 != 2 {
			t.Fatalf("%s through the proxy: %s", method, resp.Status)
		}
		return got
	}
	start := time.Now()
	do(http.MethodPut, data)
	if got := do(http.MethodGet, nil); !bytes.Equal(got, data) {
		t.Fatal("GET through the proxy returned other bytes")
	}
	// Two requests, each a round trip and 900 kB at 4 MiB/s.
	if took, min := time.Since(start), 2*(latency+200*time.Millisecond); took < min {
		t.Errorf("PUT + GET took %v, less than %v", took, min)
	}

	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("after SIGTERM: %v\nstderr: %s", err, stderr.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the proxy did not stop on SIGTERM")
	}
	var stats struct {
		Model        string
		Requests     int64
		Gets         int64
		BytesFetched int64
		Puts         int64
		BytesStored  int64
	}
	b := <-rest
	if err := json.Unmarshal(b, &stats); err != nil {
		t.Fatalf("counters: %v\n%s", err, b)
	}
	if stats.Requests != 2 || stats.Gets != 1 || stats.Puts != 1 || stats.BytesFetched != int64(len(data)) || stats.BytesStored != int64(len(data)) {
		t.Errorf("counters %+v", stats)
	}
	if !strings.Contains(stats.Model, "latency 50ms, 4.0 MiB/s per stream") {
		t.Errorf("model %q", stats.Model)
	}
	log, err := os.ReadFile(logFile)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(log)), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], " PUT /f - 201 ") || !strings.Contains(lines[1], " GET /f - 200 900000 ") {
		t.Errorf("request log:\n%s", log)
	}
}

func TestBenchDriveProxyErrors(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--upstream", "http://127.0.0.1:1/", "--listen", "0.0.0.0:0"}, "not a loopback address"},
		{[]string{"--upstream", "http://127.0.0.1:1/", "--preset", "gdrive"}, `unknown drive model preset "gdrive"`},
		{[]string{"--upstream", "http://127.0.0.1:1/", "--stream-rate", "fast"}, `--stream-rate "fast"`},
		{[]string{"--upstream", "http://127.0.0.1:1/", "--error-rate", "5"}, "not a fraction"},
		{[]string{"--upstream", "127.0.0.1:1"}, `--upstream "127.0.0.1:1"`},
		{[]string{"--upstream", "ftp://127.0.0.1/"}, "not an http:// or https:// URL"},
	} {
		_, _, err := runConfigCmd(t, append([]string{"bench", "drive-proxy"}, c.args...)...)
		if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%q: %v, want one line with %q", c.args, err, c.want)
		}
	}
}

func TestBenchDriveProxyHelp(t *testing.T) {
	stdout, _, err := runConfigCmd(t, "bench", "drive-proxy", "--help")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"--upstream", "150 ms per request", "1.2 s per request", "ranged GETs", "SIGTERM", "first line on stdout", "loopback", "kopia repository connect webdav", "Examples:"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("help lacks %q:\n%s", want, stdout)
		}
	}
}
