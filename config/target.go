package config

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
)

// ReplicaTarget is where replicated datasets go: a dataset on this host
// ("BACKUP/libvirt", for a second pool) or a dataset on another host reached
// with ssh ("ssh://root@backup.example.org:22/BACKUP/libvirt").
type ReplicaTarget struct {
	// Local is true for a dataset on this host; User, Host and Port are then empty.
	Local bool
	// User is the ssh user, DefaultSSHUser when the URL names none.
	User string
	// Host is the ssh host name or IP address (without brackets).
	Host string
	// Port is the ssh port, DefaultSSHPort when the URL names none.
	Port int
	// Dataset is the ZFS dataset on the target host.
	Dataset string
}

// String renders the target as it can be written in the file; ssh targets
// always show user and port, so that the resolved config says exactly where
// data goes.
func (t ReplicaTarget) String() string {
	if t.Local || t.Host == "" {
		return t.Dataset
	}
	return "ssh://" + t.User + "@" + net.JoinHostPort(t.Host, strconv.Itoa(t.Port)) + "/" + t.Dataset
}

// Where names the host for messages, the same way runner.Runner.Where does:
// "local" or "ssh://user@host:port".
func (t ReplicaTarget) Where() string {
	if t.Local {
		return "local"
	}
	return "ssh://" + t.User + "@" + net.JoinHostPort(t.Host, strconv.Itoa(t.Port))
}

// ParseReplicaTarget parses a replica target: a ZFS dataset name on this
// host, or ssh://[user@]host[:port]/POOL/dataset. The error says what is
// wrong with s without repeating it.
func ParseReplicaTarget(s string) (ReplicaTarget, error) {
	if s == "" {
		return ReplicaTarget{}, fmt.Errorf("is empty; write a dataset on this host (BACKUP/libvirt) or ssh://user@host/POOL/dataset")
	}
	if !strings.Contains(s, "://") {
		if strings.ContainsAny(s, "@:") && !strings.HasPrefix(s, "/") {
			// user@host:POOL/x, scp style: easy to write, but ":" is also
			// valid in dataset names, so do not guess.
			return ReplicaTarget{}, fmt.Errorf("is neither a dataset name nor an ssh URL; for a remote replica write ssh://user@host/POOL/dataset")
		}
		if err := checkDatasetName(s); err != nil {
			return ReplicaTarget{}, err
		}
		return ReplicaTarget{Local: true, Dataset: s}, nil
	}
	u, err := url.Parse(s)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		if strings.Contains(err.Error(), "invalid port") {
			return ReplicaTarget{}, fmt.Errorf("has an invalid port; it must be a number from 1 to 65535")
		}
		return ReplicaTarget{}, fmt.Errorf("is not a valid URL: %v", err)
	}
	if u.Scheme != "ssh" {
		return ReplicaTarget{}, fmt.Errorf("has scheme %q; only ssh:// is supported (or a plain dataset name for this host)", u.Scheme)
	}
	if u.Opaque != "" {
		return ReplicaTarget{}, fmt.Errorf("must have the form ssh://user@host/POOL/dataset")
	}
	if u.RawQuery != "" || u.ForceQuery || u.Fragment != "" {
		return ReplicaTarget{}, fmt.Errorf("must not have a query (?) or fragment (#); write ssh://user@host/POOL/dataset")
	}
	t := ReplicaTarget{User: DefaultSSHUser, Port: DefaultSSHPort}
	if u.User != nil {
		if _, has := u.User.Password(); has {
			return ReplicaTarget{}, fmt.Errorf("contains a password; ssh passwords are not supported, use a key (replica.identity_file)")
		}
		t.User = u.User.Username()
		if t.User == "" {
			return ReplicaTarget{}, fmt.Errorf("has an empty user name before the @")
		}
		if strings.ContainsAny(t.User, " \t/'\"\\") || strings.HasPrefix(t.User, "-") {
			return ReplicaTarget{}, fmt.Errorf("has an invalid user name %q", t.User)
		}
	}
	t.Host = u.Hostname()
	if t.Host == "" {
		return ReplicaTarget{}, fmt.Errorf("has no host; write ssh://user@host/POOL/dataset")
	}
	if net.ParseIP(t.Host) == nil && !validHostname(t.Host) {
		return ReplicaTarget{}, fmt.Errorf("has an invalid host name %q", t.Host)
	}
	if p := u.Port(); p != "" {
		port, err := strconv.Atoi(p)
		if err != nil || port < 1 || port > 65535 {
			return ReplicaTarget{}, fmt.Errorf("has an invalid port %q; it must be a number from 1 to 65535", p)
		}
		t.Port = port
	} else if strings.HasSuffix(u.Host, ":") {
		return ReplicaTarget{}, fmt.Errorf("has an empty port after the host; leave out the : for port %d", DefaultSSHPort)
	}
	t.Dataset = strings.TrimPrefix(u.Path, "/")
	if t.Dataset == "" {
		return ReplicaTarget{}, fmt.Errorf("names no dataset; write ssh://%s@%s/POOL/dataset", t.User, u.Host)
	}
	if err := checkDatasetName(t.Dataset); err != nil {
		return ReplicaTarget{}, fmt.Errorf("dataset %q %v", t.Dataset, err)
	}
	return t, nil
}

// validHostname accepts DNS names (letters, digits, hyphens, dots; labels
// not starting or ending with a hyphen) — what ssh will resolve, and nothing
// that ssh would read as an option.
func validHostname(h string) bool {
	if len(h) > 253 {
		return false
	}
	for _, label := range strings.Split(strings.TrimSuffix(h, "."), ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, r := range label {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return false
			}
		}
	}
	return true
}
