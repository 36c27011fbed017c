package kopiarepo

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/kopia/kopia/repo/blob"
	"github.com/kopia/kopia/repo/blob/gdrive"
	"github.com/kopia/kopia/repo/blob/s3"
	"github.com/kopia/kopia/repo/blob/sftp"
)

// The backends whose service the tests do not run (Google Drive, S3, an
// SFTP server) are checked up to the kopia options they produce.

func TestGDriveOptions(t *testing.T) {
	dir := t.TempDir()
	sa := filepath.Join(dir, "sa.json")
	if err := os.WriteFile(sa, []byte(`{"type":"service_account","client_email":"x@y.iam.gserviceaccount.com"}`), 0o600); err != nil {
		t.Fatal(err)
	}
	o, err := GDrive{FolderID: "F", CredentialsFile: sa}.options()
	if err != nil || o.FolderID != "F" || o.ServiceAccountCredentialsFile != sa || o.ServiceAccountCredentialJSON != nil {
		t.Errorf("gdrive options %+v, %v", o, err)
	}
	o, err = GDrive{FolderID: "F", CredentialsFile: sa, EmbedCredentials: true}.options()
	if err != nil || o.ServiceAccountCredentialsFile != "" || !strings.Contains(string(o.ServiceAccountCredentialJSON), "service_account") {
		t.Errorf("embedded gdrive options %+v, %v", o, err)
	}
	user := filepath.Join(dir, "user.json")
	os.WriteFile(user, []byte(`{"type":"authorized_user"}`), 0o600)
	for _, g := range []GDrive{{CredentialsFile: sa}, {FolderID: "F"}, {FolderID: "F", CredentialsFile: user}, {FolderID: "F", CredentialsFile: filepath.Join(dir, "missing")}} {
		if _, err := g.options(); err == nil {
			t.Errorf("gdrive %+v accepted", g)
		}
	}
	// The embedded key is a secret: status does not show it.
	m := scrubbedConfig(o)
	if _, ok := m["credentials"]; ok || m["folderID"] != "F" {
		t.Errorf("scrubbed gdrive config %v", m)
	}
	if got := describeStorage(blob.ConnectionInfo{Type: "gdrive", Config: &gdrive.Options{FolderID: "F"}}); got != "gdrive folder F" {
		t.Errorf("describe gdrive: %q", got)
	}
}

func TestSFTPOptions(t *testing.T) {
	dir := t.TempDir()
	key, kh := filepath.Join(dir, "id"), filepath.Join(dir, "known_hosts")
	os.WriteFile(key, []byte("KEY"), 0o600)
	os.WriteFile(kh, []byte("[h]:22 ssh-ed25519 AAAA"), 0o644)
	o, err := SFTP{Host: "h", Username: "u", Path: "/r", Keyfile: key, KnownHostsFile: kh}.options()
	if err != nil || o.Port != 22 || o.Keyfile != key || o.KnownHostsFile != kh {
		t.Errorf("sftp options %+v, %v", o, err)
	}
	o, err = SFTP{Host: "h", Username: "u", Path: "/r", Keyfile: key, KnownHostsFile: kh, EmbedCredentials: true}.options()
	if err != nil || o.KeyData != "KEY" || o.Keyfile != "" || o.KnownHostsData == "" {
		t.Errorf("embedded sftp options %+v, %v", o, err)
	}
	if m := scrubbedConfig(o); m["keyData"] != nil || m["host"] != "h" {
		t.Errorf("scrubbed sftp config %v", m)
	}
	for _, s := range []SFTP{{Username: "u", Path: "/r", Keyfile: key, KnownHostsFile: kh}, {Host: "h", Username: "u", Path: "/r", KnownHostsFile: kh}, {Host: "h", Username: "u", Path: "/r", Keyfile: key}} {
		if _, err := s.options(); err == nil {
			t.Errorf("sftp %+v accepted", s)
		}
	}
	if got := describeStorage(blob.ConnectionInfo{Type: "sftp", Config: &sftp.Options{Host: "h", Username: "u", Path: "/r"}}); got != "sftp u@h:/r" {
		t.Errorf("describe sftp: %q", got)
	}
}

func TestS3Scrubbed(t *testing.T) {
	o := &s3.Options{BucketName: "b", Endpoint: "e", AccessKeyID: "AK", SecretAccessKey: "SK", SessionToken: "ST"}
	m := scrubbedConfig(o)
	if m["secretAccessKey"] != nil || m["sessionToken"] != nil || m["accessKeyID"] != "AK" || m["bucket"] != "b" {
		t.Errorf("scrubbed s3 config %v", m)
	}
	if got := describeStorage(blob.ConnectionInfo{Type: "s3", Config: o}); got != "s3 e/b/" {
		t.Errorf("describe s3: %q", got)
	}
}
