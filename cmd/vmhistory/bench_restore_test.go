package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func runBench(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	cmd := newRootCommand()
	var stdout, stderr bytes.Buffer
	cmd.SetOut(&stdout)
	cmd.SetErr(&stderr)
	cmd.SetArgs(append([]string{"bench", "restore"}, args...))
	err := cmd.Execute()
	return stdout.String(), stderr.String(), err
}

func TestBenchRestoreChart(t *testing.T) {
	chart := filepath.Join(t.TempDir(), "restore.png")
	out, _, err := runBench(t, "--size", "2MiB", "--splitter", "FIXED-128K", "--preset", "none", "--window", "4",
		"--work-dir", t.TempDir(), "--chart", chart)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "prefetch w4") {
		t.Errorf("table:\n%s", out)
	}
	png, err := os.ReadFile(chart)
	if err != nil || !bytes.HasPrefix(png, []byte("\x89PNG")) {
		t.Errorf("chart %s: %v, %d bytes", chart, err, len(png))
	}
}

func TestBenchRestoreRefusesBadFlags(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--chart", "out.gif"}, `"out.gif"`},
		{[]string{"--via-mount", "--window", "8,16"}, "give one prefetch window"},
		{[]string{"--via-mount", "--splitter", "FIXED-128K,DYNAMIC-4M-BUZHASH"}, "give one splitter"},
		{[]string{"--via-mount", "--max-gap", "1MiB"}, "--max-gap does not apply to --via-mount"},
		{[]string{"--via-mount", "--size", "lots"}, `--size "lots"`},
	} {
		_, _, err := runBench(t, c.args...)
		if err == nil || !strings.Contains(err.Error(), c.want) || strings.Contains(err.Error(), "\n") {
			t.Errorf("%v: %v, want one line with %q", c.args, err, c.want)
		}
	}
}
