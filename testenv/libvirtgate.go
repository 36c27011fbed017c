package testenv

import (
	"encoding/binary"
	"io"
	"net"
	"path/filepath"
	"sync"
	"testing"
)

// libvirt RPC procedure numbers (remote_protocol.x), for LibvirtGate.
const (
	LibvirtProcDomainAbortJob    = 164
	LibvirtProcDomainManagedSave = 182
	LibvirtProcDomainCreate      = 9
)

const libvirtRemoteProgram = 0x20008086

// LibvirtGate is a unix socket in front of libvirtd's (LibvirtSocket)
// that passes the libvirt RPC through unchanged, except that while armed
// it holds the first call of one procedure (and so every later packet of
// that connection) until Release. It tells when a call of a given
// procedure arrived, held or not. A test points a child process's
// libvirt socket at Socket to stop it at a known point inside a real
// libvirt call (the test driver answers at once) without a hook in the
// code under test.
type LibvirtGate struct {
	// Socket is the gate's socket path.
	Socket string

	proc     uint32
	mu       sync.Mutex
	armed    bool
	released chan struct{}
	seen     map[uint32]chan struct{}
}

// StartLibvirtGate listens on a socket in a temporary directory; the gate
// is armed to hold the first call of procedure proc. It is closed when the
// test ends (held calls are released first).
func StartLibvirtGate(t testing.TB, proc uint32) *LibvirtGate {
	t.Helper()
	RequireLibvirt(t)
	g := &LibvirtGate{Socket: filepath.Join(t.TempDir(), "libvirt-gate.sock"), proc: proc, armed: true,
		released: make(chan struct{}), seen: map[uint32]chan struct{}{}}
	ln, err := net.Listen("unix", g.Socket)
	if err != nil {
		t.Fatalf("testenv: libvirt gate: %v", err)
	}
	var wg sync.WaitGroup
	var connsMu sync.Mutex
	var conns []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			s, err := net.Dial("unix", LibvirtSocket)
			if err != nil {
				c.Close()
				continue
			}
			connsMu.Lock()
			conns = append(conns, c, s)
			connsMu.Unlock()
			wg.Add(2)
			go func() { defer wg.Done(); io.Copy(c, s); c.Close() }()
			go func() { defer wg.Done(); g.forwardCalls(c, s); s.Close() }()
		}
	}()
	t.Cleanup(func() {
		g.Release()
		ln.Close()
		connsMu.Lock()
		for _, c := range conns {
			c.Close()
		}
		connsMu.Unlock()
		wg.Wait()
	})
	return g
}

// Called returns a channel closed once a call of procedure proc arrived.
func (g *LibvirtGate) Called(proc uint32) <-chan struct{} {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.seenLocked(proc)
}

func (g *LibvirtGate) seenLocked(proc uint32) chan struct{} {
	ch, ok := g.seen[proc]
	if !ok {
		ch = make(chan struct{})
		g.seen[proc] = ch
	}
	return ch
}

// Release lets the held call and everything behind it through, and
// disarms the gate.
func (g *LibvirtGate) Release() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.armed {
		g.armed = false
		close(g.released)
	}
}

// forwardCalls copies the client's packets to libvirtd. Reading goes on
// while a packet is held, so that later calls are still seen (Called).
func (g *LibvirtGate) forwardCalls(client, server net.Conn) {
	type packet struct {
		data []byte
		hold bool
	}
	out := make(chan packet, 4096)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for p := range out {
			if p.hold {
				<-g.released
			}
			if _, err := server.Write(p.data); err != nil {
				return
			}
		}
	}()
	defer func() { close(out); <-done }()
	for {
		var lenBuf [4]byte
		if _, err := io.ReadFull(client, lenBuf[:]); err != nil {
			return
		}
		n := binary.BigEndian.Uint32(lenBuf[:])
		if n < 28 || n > 32<<20 {
			return
		}
		data := make([]byte, n)
		copy(data, lenBuf[:])
		if _, err := io.ReadFull(client, data[4:]); err != nil {
			return
		}
		program := binary.BigEndian.Uint32(data[4:8])
		proc := binary.BigEndian.Uint32(data[12:16])
		typ := binary.BigEndian.Uint32(data[16:20])
		hold := false
		if program == libvirtRemoteProgram && typ == 0 { // a call
			g.mu.Lock()
			if g.armed && proc == g.proc {
				hold = true
			}
			ch := g.seenLocked(proc)
			select {
			case <-ch:
			default:
				close(ch)
			}
			g.mu.Unlock()
		}
		select {
		case out <- packet{data, hold}:
		case <-done:
			return
		}
	}
}
