package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestMountCommand(t *testing.T) {
	sb := newRestoreSandbox(t)
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cmd := newRootCommand()
	var stderr bytes.Buffer
	cmd.SetErr(&stderr)
	cmd.SetArgs([]string{"mount", dir, "--config", sb.config, "--refresh", "1s"})
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()

	file := filepath.Join(dir, "latest", "images", "vm.img")
	deadline := time.Now().Add(30 * time.Second)
	var got []byte
	for {
		var err error
		if got, err = os.ReadFile(file); err == nil {
			break
		}
		select {
		case err := <-done:
			t.Fatalf("mount ended: %v\n%s", err, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never readable: %v", file, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if sha(got) != sha(sb.image) {
		t.Errorf("vm.img through the mount differs from the snapshot")
	}
	cancel() // as SIGINT/SIGTERM
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("mount: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("mount did not return after cancel")
	}
	info, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(info), " "+dir+" ") {
		t.Errorf("%s still mounted", dir)
	}
}

func TestMountRefusesBadWindow(t *testing.T) {
	cmd := newRootCommand()
	cmd.SetErr(&bytes.Buffer{})
	cmd.SetArgs([]string{"mount", t.TempDir(), "--window", "0"})
	if err := cmd.Execute(); err == nil || err.Error() != "--window 0 is out of range 1..256" {
		t.Errorf("mount --window 0: %v", err)
	}
}
