package kopiarepo

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"time"

	"github.com/kopia/kopia/repo/blob"
	"github.com/kopia/kopia/repo/blob/filesystem"
	"github.com/kopia/kopia/repo/blob/gdrive"
	"github.com/kopia/kopia/repo/blob/rclone"
	"github.com/kopia/kopia/repo/blob/s3"
	"github.com/kopia/kopia/repo/blob/sftp"
	"github.com/kopia/kopia/repo/blob/webdav"
	"github.com/studio-b12/gowebdav"

	// Open builds the storage named in a repository config written by
	// anyone, kopia's own CLI included, through kopia's storage registry:
	// every backend kopia's CLI can connect to must be registered, not
	// only the ones vmhistory's "repo create" offers.
	_ "github.com/kopia/kopia/repo/blob/azure"
	_ "github.com/kopia/kopia/repo/blob/b2"
	_ "github.com/kopia/kopia/repo/blob/gcs"
)

// StorageSpec says where a repository's blobs live. It is one of
// Filesystem, WebDAV, SFTP, S3, Rclone or GDrive; each mirrors the flags of
// the kopia CLI's "repository create|connect <type>" subcommand of the same
// name and builds the same storage configuration, so a repository config
// written by vmhistory is one kopia's CLI accepts and the other way round.
type StorageSpec interface {
	// Type is kopia's name of the storage type ("filesystem", "webdav"...).
	Type() string
	// newStorage opens the storage; isCreate allows creating the location
	// (a directory) where the backend supports it.
	newStorage(ctx context.Context, isCreate bool) (blob.Storage, error)
}

// kopia CLI defaults for new files and directories of a filesystem repository.
const (
	defaultRepoFileMode = 0o600
	defaultRepoDirMode  = 0o700
)

// Filesystem is a repository in a local directory (or a mounted network
// filesystem), like "kopia repository create filesystem --path".
type Filesystem struct {
	// Path is the repository directory, absolute. It is created if missing.
	Path string
}

// Type implements StorageSpec.
func (Filesystem) Type() string { return "filesystem" }

// ensureEmptyLocation refuses a directory that holds anything: kopia's
// blob listing sees only its own files (*.f), so a directory of someone
// else's files would pass for empty and get a repository mixed into it.
func (s Filesystem) ensureEmptyLocation() error {
	if !filepath.IsAbs(s.Path) {
		return nil // newStorage says so
	}
	entries, err := os.ReadDir(s.Path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("cannot read %s: %w", s.Path, err)
	case len(entries) > 0:
		return fmt.Errorf("the directory %s is not empty (it holds %q%s); use an empty or new directory, or connect to the repository that is there",
			s.Path, entries[0].Name(), moreEntries(len(entries)-1))
	}
	return nil
}

func moreEntries(n int) string {
	if n == 0 {
		return ""
	}
	return fmt.Sprintf(" and %d more", n)
}

func (s Filesystem) newStorage(ctx context.Context, isCreate bool) (blob.Storage, error) {
	if !filepath.IsAbs(s.Path) {
		return nil, fmt.Errorf("filesystem repository path %q must be absolute", s.Path)
	}
	return filesystem.New(ctx, &filesystem.Options{
		Path:          filepath.Clean(s.Path),
		FileMode:      defaultRepoFileMode,
		DirectoryMode: defaultRepoDirMode,
	}, isCreate)
}

// WebDAV is a repository on a WebDAV server, like "kopia repository create
// webdav --url".
type WebDAV struct {
	// URL of the repository directory on the server, e.g.
	// https://dav.example.com/kopia/.
	URL string
	// Username and Password authenticate to the server (basic or digest
	// auth); both empty for none. kopia stores them in the repository
	// config file, which it writes with mode 600.
	Username, Password string
}

// Type implements StorageSpec.
func (WebDAV) Type() string { return "webdav" }

func (s WebDAV) newStorage(ctx context.Context, isCreate bool) (blob.Storage, error) {
	if s.URL == "" {
		return nil, errors.New("webdav repository needs a URL")
	}
	if isCreate {
		// kopia creates the directories below the URL, not the folder
		// the URL names; "kopia repository create webdav" fails on a
		// missing folder. Create it.
		if err := mkdirWebDAV(s); err != nil {
			return nil, err
		}
	}
	return webdav.New(ctx, &webdav.Options{URL: s.URL, Username: s.Username, Password: s.Password}, isCreate)
}

func mkdirWebDAV(s WebDAV) error {
	u, err := url.Parse(s.URL)
	if err != nil {
		return fmt.Errorf("webdav URL %q: %w", s.URL, err)
	}
	dir := u.Path
	u.Path, u.RawPath = "", ""
	c := gowebdav.NewClient(u.String(), s.Username, s.Password)
	c.SetTimeout(time.Minute)
	if dir == "" || dir == "/" {
		return nil
	}
	err = c.MkdirAll(dir, defaultRepoDirMode)
	if err == nil || gowebdav.IsErrCode(err, http.StatusMethodNotAllowed) { // 405: exists
		return nil
	}
	return fmt.Errorf("create the WebDAV folder %s: %w", s.URL, err)
}

// SFTP is a repository on an SSH server, like "kopia repository create sftp".
type SFTP struct {
	// Host and Port (22 when 0) of the SSH server, Username to log in as.
	Host     string
	Port     int
	Username string
	// Path is the repository directory on the server.
	Path string
	// Keyfile is the private key; Password the login password instead.
	Keyfile, Password string
	// KnownHostsFile holds the server's host key; required, the host key
	// is always checked.
	KnownHostsFile string
	// EmbedCredentials copies the key and known_hosts into the repository
	// config instead of naming the files.
	EmbedCredentials bool
}

// Type implements StorageSpec.
func (SFTP) Type() string { return "sftp" }

func (s SFTP) options() (*sftp.Options, error) {
	o := &sftp.Options{Path: s.Path, Host: s.Host, Port: s.Port, Username: s.Username, Password: s.Password}
	if o.Port == 0 {
		o.Port = 22
	}
	switch {
	case s.Host == "" || s.Username == "" || s.Path == "":
		return nil, errors.New("sftp repository needs a host, a username and a path")
	case s.Password == "" && s.Keyfile == "":
		return nil, errors.New("sftp repository needs a key file or a password")
	case s.KnownHostsFile == "":
		return nil, errors.New("sftp repository needs a known_hosts file holding the server's host key")
	}
	if s.Password == "" {
		key, err := filepath.Abs(s.Keyfile)
		if err != nil {
			return nil, err
		}
		o.Keyfile = key
	}
	kh, err := filepath.Abs(s.KnownHostsFile)
	if err != nil {
		return nil, err
	}
	o.KnownHostsFile = kh
	if s.EmbedCredentials {
		if o.Keyfile != "" {
			d, err := os.ReadFile(o.Keyfile)
			if err != nil {
				return nil, fmt.Errorf("read sftp key file: %w", err)
			}
			o.KeyData, o.Keyfile = string(d), ""
		}
		d, err := os.ReadFile(o.KnownHostsFile)
		if err != nil {
			return nil, fmt.Errorf("read known_hosts file: %w", err)
		}
		o.KnownHostsData, o.KnownHostsFile = string(d), ""
	}
	return o, nil
}

func (s SFTP) newStorage(ctx context.Context, isCreate bool) (blob.Storage, error) {
	o, err := s.options()
	if err != nil {
		return nil, err
	}
	return sftp.New(ctx, o, isCreate)
}

// S3 is a repository in an S3-compatible bucket, like "kopia repository
// create s3".
type S3 struct {
	Bucket string
	// Endpoint is the server, s3.amazonaws.com when empty.
	Endpoint string
	Region   string
	// Prefix is prepended to every object name; end it with / to use a
	// "directory".
	Prefix                                     string
	AccessKeyID, SecretAccessKey, SessionToken string
	// DisableTLS talks plain HTTP; DisableTLSVerification accepts any certificate.
	DisableTLS, DisableTLSVerification bool
}

// Type implements StorageSpec.
func (S3) Type() string { return "s3" }

func (s S3) newStorage(ctx context.Context, isCreate bool) (blob.Storage, error) {
	if s.Bucket == "" {
		return nil, errors.New("s3 repository needs a bucket")
	}
	o := &s3.Options{
		BucketName: s.Bucket, Prefix: s.Prefix, Endpoint: s.Endpoint, Region: s.Region,
		AccessKeyID: s.AccessKeyID, SecretAccessKey: s.SecretAccessKey, SessionToken: s.SessionToken,
		DoNotUseTLS: s.DisableTLS, DoNotVerifyTLS: s.DisableTLSVerification,
	}
	if o.Endpoint == "" {
		o.Endpoint = "s3.amazonaws.com"
	}
	return s3.New(ctx, o, isCreate)
}

// Rclone is a repository on any rclone remote, reached through an rclone
// process kopia starts, like "kopia repository create rclone".
type Rclone struct {
	// RemotePath is remote:path as rclone names it.
	RemotePath string
	// Exe is the rclone binary, "rclone" in PATH when empty.
	Exe string
	// Args are extra rclone arguments.
	Args []string
	// EmbedConfigFile, when set, is an rclone.conf whose content is copied
	// into the repository config.
	EmbedConfigFile string
}

// Type implements StorageSpec.
func (Rclone) Type() string { return "rclone" }

func (s Rclone) newStorage(ctx context.Context, isCreate bool) (blob.Storage, error) {
	if s.RemotePath == "" {
		return nil, errors.New("rclone repository needs a remote path (remote:path)")
	}
	// AtomicWrites is the kopia CLI's default for rclone.
	o := &rclone.Options{RemotePath: s.RemotePath, RCloneExe: s.Exe, RCloneArgs: s.Args, AtomicWrites: true}
	if s.EmbedConfigFile != "" {
		d, err := os.ReadFile(s.EmbedConfigFile)
		if err != nil {
			return nil, fmt.Errorf("read rclone config: %w", err)
		}
		o.EmbeddedConfig = string(d)
	}
	return rclone.New(ctx, o, isCreate)
}

// GDrive is a repository in a Google Drive folder, reached with a Google
// Cloud service account, like "kopia repository create gdrive". Share the
// folder with the service account's e-mail address (as editor) first.
type GDrive struct {
	// FolderID is the last part of the folder's URL
	// (https://drive.google.com/drive/folders/FOLDER_ID).
	FolderID string
	// CredentialsFile is the service account's JSON key file.
	CredentialsFile string
	// EmbedCredentials copies the key into the repository config instead
	// of naming the file.
	EmbedCredentials bool
}

// Type implements StorageSpec.
func (GDrive) Type() string { return "gdrive" }

func (s GDrive) options() (*gdrive.Options, error) {
	if s.FolderID == "" {
		return nil, errors.New("gdrive repository needs a folder ID")
	}
	if s.CredentialsFile == "" {
		return nil, errors.New("gdrive repository needs a service account credentials file (JSON)")
	}
	data, err := os.ReadFile(s.CredentialsFile)
	if err != nil {
		return nil, fmt.Errorf("read gdrive credentials: %w", err)
	}
	var probe struct {
		Type string `json:"type"`
	}
	if err := json.Unmarshal(data, &probe); err != nil {
		return nil, fmt.Errorf("gdrive credentials %s are not JSON: %w", s.CredentialsFile, err)
	}
	if probe.Type != "service_account" {
		return nil, fmt.Errorf("gdrive credentials %s are not a service account key (type %q, want \"service_account\")", s.CredentialsFile, probe.Type)
	}
	o := &gdrive.Options{FolderID: s.FolderID}
	if s.EmbedCredentials {
		o.ServiceAccountCredentialJSON = json.RawMessage(data)
	} else {
		abs, err := filepath.Abs(s.CredentialsFile)
		if err != nil {
			return nil, err
		}
		o.ServiceAccountCredentialsFile = abs
	}
	return o, nil
}

func (s GDrive) newStorage(ctx context.Context, isCreate bool) (blob.Storage, error) {
	o, err := s.options()
	if err != nil {
		return nil, err
	}
	return gdrive.New(ctx, o, isCreate)
}
