package backup

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/vmhistory/vmhistory/safefile"
)

// StoppedVM is a VM this tool stopped (or suspended, or froze) and has not
// yet started again.
type StoppedVM struct {
	Name       string    `json:"name"`
	Mode       string    `json:"mode"`
	Dataset    string    `json:"dataset"`
	Mountpoint string    `json:"mountpoint"`
	Since      time.Time `json:"since"`
}

// StoppedVMs is the crash record of a run: which VMs it took down. It is
// written before each VM is stopped and cleared once the VM runs again, so
// a run killed in between leaves exactly the VMs the next run (or `backup
// --recover`) must start — and never one the admin stopped.
type StoppedVMs struct {
	path string
	mu   sync.Mutex

	RunID   string      `json:"run_id"`
	PID     int         `json:"pid"`
	Started time.Time   `json:"started"`
	VMs     []StoppedVM `json:"vms"`
}

const stoppedVMsFile = "stopped-vms.json"

// LoadStoppedVMs reads the record left in dir, or returns an empty one.
func LoadStoppedVMs(dir string) (*StoppedVMs, error) {
	s := &StoppedVMs{path: filepath.Join(dir, stoppedVMsFile)}
	data, err := safefile.ReadFile(s.path)
	if errors.Is(err, os.ErrNotExist) {
		return s, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read stopped-VM record: %w", err)
	}
	if err := json.Unmarshal(data, s); err != nil {
		return nil, fmt.Errorf("stopped-VM record %s is damaged (%v); inspect it, start the VMs it names by hand, then delete it", s.path, err)
	}
	return s, nil
}

// Path is the record's file.
func (s *StoppedVMs) Path() string { return s.path }

// Names lists the recorded VMs.
func (s *StoppedVMs) Names() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var names []string
	for _, vm := range s.VMs {
		names = append(names, vm.Name)
	}
	return names
}

// Empty reports whether no VM is recorded.
func (s *StoppedVMs) Empty() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.VMs) == 0
}

// Begin starts a new run's record. A record still holding VMs must be
// recovered first; Begin refuses to overwrite it.
func (s *StoppedVMs) Begin(runID string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.VMs) > 0 {
		return fmt.Errorf("%s still lists VMs stopped by run %s", s.path, s.RunID)
	}
	s.RunID, s.PID, s.Started = runID, os.Getpid(), time.Now().UTC()
	return nil
}

// Add records a VM before it is stopped, and syncs the file to disk.
func (s *StoppedVMs) Add(vm StoppedVM) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if vm.Since.IsZero() {
		vm.Since = time.Now().UTC()
	}
	if slices.ContainsFunc(s.VMs, func(v StoppedVM) bool { return v.Name == vm.Name }) {
		return nil
	}
	s.VMs = append(s.VMs, vm)
	return s.saveLocked()
}

// Remove forgets a VM that runs again.
func (s *StoppedVMs) Remove(name string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.VMs = slices.DeleteFunc(s.VMs, func(v StoppedVM) bool { return v.Name == name })
	return s.saveLocked()
}

func (s *StoppedVMs) saveLocked() error {
	if len(s.VMs) == 0 {
		if err := os.Remove(s.path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("clear stopped-VM record: %w", err)
		}
		return syncDir(filepath.Dir(s.path))
	}
	data, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return writeFileAtomic(s.path, append(data, '\n'), 0o600)
}

// writeFileAtomic replaces path in the state directory (created when
// missing) with data, atomically; a symbolic link or special file planted
// at path is refused (see safefile.WriteFileAtomic).
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	return safefile.WriteFileAtomic(path, data, mode)
}

func syncDir(dir string) error { return safefile.SyncDir(dir) }
