// Package virt talks to libvirtd through its unix socket with
// github.com/digitalocean/go-libvirt (pure Go, no libvirt C library): it
// lists the domains whose disks live on a dataset, and quiesces them for a
// snapshot and brings them back (managed save, save to a file on the dataset,
// suspend, guest-agent filesystem freeze, or nothing).
//
// The nightly job runs with nobody watching, so the package is built around
// one rule: a VM that this package stopped is started again. Every libvirt
// call is bounded (go-libvirt calls cannot be cancelled, so a call that
// overruns its bound is abandoned and its outcome is still awaited before
// the VM is resumed), quiescing reports what it actually touched even when
// it fails half-way, resuming continues past errors, and Recover repairs
// what a crashed run left behind.
//
// libvirt's test driver (test:///default, used by the tests) keeps its state
// per connection: everything about one set of VMs must go through one Conn.
package virt

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
)

// DialTimeout bounds connecting to libvirtd's socket and opening the
// connection, unless the context passed to Dial ends sooner.
const DialTimeout = 30 * time.Second

// callTimeout bounds a libvirt call that does not move data (listing,
// state, lookups) when the caller's context has no deadline of its own.
const callTimeout = 2 * time.Minute

// Conn is one connection to a libvirt driver (qemu:///system in production,
// test:///default in tests) through libvirtd's unix socket. It is safe for
// concurrent use: go-libvirt multiplexes calls on the socket.
type Conn struct {
	socket string
	uri    string

	mu sync.Mutex
	lv *libvirt.Libvirt // replaced by reconnect
	// wrap, set by tests, wraps the real client to inject slowness or
	// failures around the real calls that change a domain's state.
	wrap func(ops) ops
}

// Dial connects to libvirtd's unix socket and opens uri on it (like
// "qemu:///system", or "test:///default" for libvirt's test driver). A
// missing socket or a daemon that does not answer is reported with the
// socket's path.
func Dial(ctx context.Context, socket, uri string) (*Conn, error) {
	if socket == "" {
		return nil, errors.New("libvirt: no socket path given")
	}
	if uri == "" {
		return nil, errors.New("libvirt: no connection URI given")
	}
	lv, err := connect(ctx, socket, uri)
	if err != nil {
		return nil, err
	}
	return &Conn{lv: lv, socket: socket, uri: uri}, nil
}

func connect(ctx context.Context, socket, uri string) (*libvirt.Libvirt, error) {
	if _, err := os.Stat(socket); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("libvirt: socket %s does not exist: is libvirtd running? (start it, e.g. systemctl start libvirtd)", socket)
		}
		return nil, fmt.Errorf("libvirt: socket %s: %w", socket, err)
	}
	timeout := DialTimeout
	if dl, ok := ctx.Deadline(); ok && time.Until(dl) < timeout {
		timeout = max(time.Until(dl), time.Millisecond)
	}
	lv := libvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(socket), dialers.WithLocalTimeout(timeout)))

	done := make(chan error, 1)
	go func() { done <- lv.ConnectToURI(libvirt.ConnectURI(uri)) }()
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	var err error
	select {
	case err = <-done:
		if err != nil {
			return nil, dialError(socket, uri, err)
		}
		return lv, nil
	case <-ctx.Done():
		err = context.Cause(ctx)
	case <-timer.C:
		err = fmt.Errorf("no answer within %v", timeout)
	}
	// If the connection still completes, close it rather than leak it.
	go func() {
		if <-done == nil {
			lv.Disconnect()
		}
	}()
	return nil, dialError(socket, uri, err)
}

func dialError(socket, uri string, err error) error {
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("libvirt: libvirtd does not listen on %s (connection refused): is libvirtd running?", socket)
	case errors.Is(err, syscall.ENOENT):
		return fmt.Errorf("libvirt: socket %s does not exist: is libvirtd running?", socket)
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return fmt.Errorf("libvirt: no permission to use %s: run as root (or as a member of the libvirt group): %w", socket, err)
	}
	return fmt.Errorf("libvirt: open %s through %s: %w", uri, socket, err)
}

// Close closes the connection. With the test driver this discards the
// driver's state (the VMs defined on this connection).
func (c *Conn) Close() error {
	err := await(context.Background(), 30*time.Second, c.client().Disconnect)
	if err != nil {
		return fmt.Errorf("libvirt: close connection to %s: %w", c.uri, err)
	}
	return nil
}

// URI is the connection URI the Conn was opened with.
func (c *Conn) URI() string { return c.uri }

// Socket is libvirtd's socket the Conn goes through.
func (c *Conn) Socket() string { return c.socket }

// Client is the underlying go-libvirt client, for what this package does
// not wrap (tests define domains with it on the same test-driver
// connection).
// After a reconnect (see Resume) it is a new client.
func (c *Conn) Client() *libvirt.Libvirt { return c.client() }

func (c *Conn) client() *libvirt.Libvirt {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lv
}

// ops is the client for the calls that change a domain's state.
func (c *Conn) ops() ops {
	lv := c.client()
	if c.wrap != nil {
		return c.wrap(lv)
	}
	return lv
}

// lost reports whether the connection to libvirtd is gone (libvirtd was
// restarted, say by a package upgrade).
func (c *Conn) lost() bool { return !c.client().IsConnected() }

// reconnect replaces the client used, if its connection to libvirtd is
// lost, with a new connection, and reports whether a call that failed on
// used is worth retrying (there is a new client, made here or by another
// goroutine). With qemu:///system the new connection sees the same
// domains; with the test driver's default URI it starts from the driver's
// initial state.
func (c *Conn) reconnect(ctx context.Context, used *libvirt.Libvirt) (bool, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.lv != used {
		return true, nil
	}
	if used.IsConnected() {
		return false, nil
	}
	// libvirtd takes a moment to come back after a restart.
	give := time.Now().Add(reconnectWait)
	for {
		lv, err := connect(ctx, c.socket, c.uri)
		if err == nil {
			c.lv = lv
			return true, nil
		}
		if time.Now().After(give) || ctx.Err() != nil {
			return false, err
		}
		select {
		case <-time.After(time.Second):
		case <-ctx.Done():
			return false, err
		}
	}
}

// reconnectWait is how long reconnect keeps trying while libvirtd does not
// answer.
const reconnectWait = 30 * time.Second

// await runs fn, a libvirt call that cannot be cancelled, and returns its
// error, or an error when ctx ends or timeout passes first (timeout <= 0:
// callTimeout unless ctx has a deadline). An abandoned call keeps running in
// the background; its result is dropped.
func await(ctx context.Context, timeout time.Duration, fn func() error) error {
	if timeout <= 0 {
		if _, ok := ctx.Deadline(); ok {
			timeout = 0
		} else {
			timeout = callTimeout
		}
	}
	if err := ctx.Err(); err != nil {
		return context.Cause(ctx)
	}
	done := make(chan error, 1)
	go func() { done <- fn() }()
	var timer <-chan time.Time
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		timer = t.C
	}
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		return context.Cause(ctx)
	case <-timer:
		return &TimeoutError{After: timeout}
	}
}

// TimeoutError is returned when a libvirt call did not answer within its
// bound. The call may still complete inside libvirtd afterwards.
type TimeoutError struct {
	After time.Duration
	// What names the bound, like "save_timeout"; may be empty.
	What string
}

func (e *TimeoutError) Error() string {
	if e.What != "" {
		return fmt.Sprintf("no answer from libvirt within %v (%s)", e.After, e.What)
	}
	return fmt.Sprintf("no answer from libvirt within %v", e.After)
}
