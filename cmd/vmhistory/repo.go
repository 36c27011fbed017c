package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/vmhistory/vmhistory/config"
	"github.com/vmhistory/vmhistory/kopiarepo"
)

// newRepoCommand groups the commands that create, connect and inspect the
// kopia repository named by the configuration's kopia section.
func newRepoCommand(opts *globalOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "repo",
		Short: "Create, connect and inspect the kopia repository snapshots are uploaded to",
		Long: `Create, connect and inspect the kopia repository snapshots are uploaded to.

The nightly backup uploads every ZFS snapshot to the kopia repository that
kopia.config_file connects to. "vmhistory repo create" makes a new
repository and writes that file; "vmhistory repo connect" writes it for a
repository that exists already (made by vmhistory, by kopia's own CLI, or
by another host); "vmhistory repo status" shows what it connects to.

The repository password is read, in this order, from the file named by
--password-file, from the environment variable KOPIA_PASSWORD (which, as in
kopia's own CLI, wins over the file and stands in for a missing one), or
from kopia.password_file, never from the command line, where every local
user could read it. A password file readable by group or other is refused.
Keep
the password somewhere safe besides this host: without it the repository
cannot be read.

The config file written is kopia's own, so kopia's CLI works on the same
repository:
  KOPIA_PASSWORD=... kopia --config-file=/etc/vmhistory/kopia.config snapshot list --all

This host (kopia.user@kopia.host) becomes the repository's maintenance
owner when a repository is created, or connected to one that has none:
kopia's maintenance (deleting expired data, compacting indexes) runs after
the nightly uploads.`,
		Example: `  # A new repository on Google Drive, through a service account:
  (umask 077; head -c 30 /dev/urandom | base64 > /etc/vmhistory/kopia.password)
  vmhistory repo create gdrive --folder-id 1AbCdEfGhIjKlMnOpQrStUvWxYz --credentials-file /etc/vmhistory/gdrive-sa.json
  vmhistory repo status`,
	}
	cmd.AddCommand(newRepoCreateCommand(opts), newRepoConnectCommand(opts), newRepoStatusCommand(opts))
	return cmd
}

// repoConnectFlags are the flags create and connect share.
type repoConnectFlags struct {
	passwordFile    string
	cacheDirectory  string
	overwrite       bool
	takeMaintenance bool
	splitter        string
}

func (f *repoConnectFlags) register(fs *pflag.FlagSet, create bool) {
	fs.StringVar(&f.passwordFile, "password-file", "", "file holding the repository password (mode 600); default kopia.password_file, or $KOPIA_PASSWORD when set")
	fs.StringVar(&f.cacheDirectory, "cache-directory", "", "kopia's local cache of indexes and contents (default ~/.cache/kopia/<hash>)")
	fs.BoolVar(&f.overwrite, "overwrite", false, "replace an existing kopia.config_file (it connects to another repository); a symbolic link or special file there is refused even so")
	if create {
		fs.StringVar(&f.splitter, "object-splitter", "", "the repository's default splitter (default DYNAMIC-4M-BUZHASH); kopia.splitter in the configuration overrides it for vmhistory's uploads")
	} else {
		fs.BoolVar(&f.takeMaintenance, "take-maintenance", false, "make this host the maintenance owner even if another client owns it")
	}
}

// repoBackend is one kind of storage, a subcommand of create and connect.
type repoBackend struct {
	name, short, long, example string
	// flags registers the backend's flags and returns the function that
	// builds the storage spec from them once parsed.
	flags func(fs *pflag.FlagSet) func() (kopiarepo.StorageSpec, error)
}

var repoBackends = []repoBackend{
	{
		name:  "filesystem",
		short: "a directory on this host or a mounted network filesystem",
		long: `The repository is a directory: a local disk, or an NFS or CIFS mount. The
directory is created if missing.`,
		example: "--path /srv/kopia",
		flags: func(fs *pflag.FlagSet) func() (kopiarepo.StorageSpec, error) {
			var s kopiarepo.Filesystem
			fs.StringVar(&s.Path, "path", "", "repository directory, absolute (required)")
			return func() (kopiarepo.StorageSpec, error) {
				if s.Path == "" {
					return nil, errors.New("--path is required")
				}
				return s, nil
			}
		},
	},
	{
		name:  "webdav",
		short: "a folder on a WebDAV server (Nextcloud, ownCloud, rclone serve webdav...)",
		long: `The repository is a folder on a WebDAV server, created if missing. The
WebDAV password is read from --webdav-password-file or from the environment
variable KOPIA_WEBDAV_PASSWORD; kopia stores it in kopia.config_file, which
it writes with mode 600.`,
		example: "--url https://dav.example.com/remote.php/dav/files/backup/kopia/ --username backup --webdav-password-file /etc/vmhistory/dav.password",
		flags: func(fs *pflag.FlagSet) func() (kopiarepo.StorageSpec, error) {
			var s kopiarepo.WebDAV
			var pwFile string
			fs.StringVar(&s.URL, "url", "", "URL of the repository folder (required)")
			fs.StringVar(&s.Username, "username", "", "WebDAV user name")
			fs.StringVar(&pwFile, "webdav-password-file", "", "file holding the WebDAV password (mode 600); default $KOPIA_WEBDAV_PASSWORD")
			return func() (kopiarepo.StorageSpec, error) {
				if s.URL == "" {
					return nil, errors.New("--url is required")
				}
				pw, err := secret(pwFile, "KOPIA_WEBDAV_PASSWORD")
				s.Password = pw
				return s, err
			}
		},
	},
	{
		name:  "sftp",
		short: "a directory on an SSH server",
		long: `The repository is a directory on an SSH server, reached with kopia's own SSH
client: a private key (or a password from --sftp-password-file), and the
server's host key from a known_hosts file, always checked.`,
		example: "--host backup.example.com --username kopia --path /srv/kopia --keyfile /root/.ssh/id_ed25519 --known-hosts /root/.ssh/known_hosts",
		flags: func(fs *pflag.FlagSet) func() (kopiarepo.StorageSpec, error) {
			var s kopiarepo.SFTP
			var pwFile string
			fs.StringVar(&s.Host, "host", "", "SSH server (required)")
			fs.IntVar(&s.Port, "port", 22, "SSH port")
			fs.StringVar(&s.Username, "username", "", "user to log in as (required)")
			fs.StringVar(&s.Path, "path", "", "repository directory on the server (required)")
			fs.StringVar(&s.Keyfile, "keyfile", "", "private key file")
			fs.StringVar(&pwFile, "sftp-password-file", "", "file holding the SSH password, instead of a key (mode 600)")
			fs.StringVar(&s.KnownHostsFile, "known-hosts", "", "known_hosts file with the server's host key (required)")
			fs.BoolVar(&s.EmbedCredentials, "embed-credentials", false, "copy the key and known_hosts into kopia.config_file")
			return func() (kopiarepo.StorageSpec, error) {
				if pwFile != "" {
					pw, err := kopiarepo.ReadPasswordFile(pwFile)
					if err != nil {
						return nil, err
					}
					s.Password = pw
				}
				return s, nil
			}
		},
	},
	{
		name:  "s3",
		short: "an S3-compatible bucket (AWS, MinIO, Wasabi, Backblaze S3...)",
		long: `The repository is in an S3 bucket, optionally under a prefix. The access key
is read from --access-key or AWS_ACCESS_KEY_ID, the secret key from
--secret-access-key-file or AWS_SECRET_ACCESS_KEY, a session token from
AWS_SESSION_TOKEN.`,
		example: "--bucket vm-backups --prefix kvm1/ --endpoint s3.eu-central-1.amazonaws.com --secret-access-key-file /etc/vmhistory/s3.secret",
		flags: func(fs *pflag.FlagSet) func() (kopiarepo.StorageSpec, error) {
			var s kopiarepo.S3
			var secretFile string
			fs.StringVar(&s.Bucket, "bucket", "", "bucket name (required)")
			fs.StringVar(&s.Endpoint, "endpoint", "s3.amazonaws.com", "S3 server")
			fs.StringVar(&s.Region, "region", "", "region")
			fs.StringVar(&s.Prefix, "prefix", "", "prefix of every object; end it with / for a \"directory\"")
			fs.StringVar(&s.AccessKeyID, "access-key", "", "access key ID (default $AWS_ACCESS_KEY_ID)")
			fs.StringVar(&secretFile, "secret-access-key-file", "", "file holding the secret access key (mode 600); default $AWS_SECRET_ACCESS_KEY")
			fs.BoolVar(&s.DisableTLS, "disable-tls", false, "talk plain HTTP")
			fs.BoolVar(&s.DisableTLSVerification, "disable-tls-verification", false, "accept any TLS certificate")
			return func() (kopiarepo.StorageSpec, error) {
				if s.Bucket == "" {
					return nil, errors.New("--bucket is required")
				}
				if s.AccessKeyID == "" {
					s.AccessKeyID = os.Getenv("AWS_ACCESS_KEY_ID")
				}
				s.SessionToken = os.Getenv("AWS_SESSION_TOKEN")
				key, err := secret(secretFile, "AWS_SECRET_ACCESS_KEY")
				s.SecretAccessKey = key
				return s, err
			}
		},
	},
	{
		name:  "rclone",
		short: "any storage rclone reaches (kopia runs rclone for each connection)",
		long: `The repository is on an rclone remote: kopia starts "rclone serve webdav" for
the remote for as long as the repository is open. Configure the remote
with "rclone config" first, or embed an rclone.conf into kopia.config_file.`,
		example: "--remote-path onedrive:backups/kopia",
		flags: func(fs *pflag.FlagSet) func() (kopiarepo.StorageSpec, error) {
			var s kopiarepo.Rclone
			fs.StringVar(&s.RemotePath, "remote-path", "", "remote:path as rclone names it (required)")
			fs.StringVar(&s.Exe, "rclone-exe", "", "rclone binary (default rclone in PATH)")
			fs.StringArrayVar(&s.Args, "rclone-args", nil, "extra rclone argument (repeatable)")
			fs.StringVar(&s.EmbedConfigFile, "embed-rclone-config", "", "rclone.conf to copy into kopia.config_file")
			return func() (kopiarepo.StorageSpec, error) {
				if s.RemotePath == "" {
					return nil, errors.New("--remote-path is required")
				}
				return s, nil
			}
		},
	},
	{
		name:  "gdrive",
		short: "a Google Drive folder, through a Google Cloud service account",
		long: `The repository is a Google Drive folder, reached with a service account's
JSON key. Create the service account in Google Cloud (IAM > Service
accounts), enable the Drive API, download a JSON key, and share the Drive
folder with the account's e-mail address as editor. The folder ID is the
last part of the folder's URL.`,
		example: "--folder-id 1AbCdEfGhIjKlMnOpQrStUvWxYz --credentials-file /etc/vmhistory/gdrive-sa.json",
		flags: func(fs *pflag.FlagSet) func() (kopiarepo.StorageSpec, error) {
			var s kopiarepo.GDrive
			fs.StringVar(&s.FolderID, "folder-id", "", "ID of the Drive folder (required)")
			fs.StringVar(&s.CredentialsFile, "credentials-file", "", "service account JSON key (required)")
			fs.BoolVar(&s.EmbedCredentials, "embed-credentials", false, "copy the key into kopia.config_file")
			return func() (kopiarepo.StorageSpec, error) {
				if s.FolderID == "" || s.CredentialsFile == "" {
					return nil, errors.New("--folder-id and --credentials-file are required")
				}
				return s, nil
			}
		},
	},
}

// secret reads a secret from file when given, else from the environment
// variable env (possibly unset: then "").
func secret(file, env string) (string, error) {
	if file != "" {
		return kopiarepo.ReadPasswordFile(file)
	}
	return os.Getenv(env), nil
}

func newRepoCreateCommand(opts *globalOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "create BACKEND [flags]",
		Short: "Create a new kopia repository and connect to it",
		Long: `Create a new kopia repository in an empty location and connect to it: write
kopia.config_file, store kopia's default policy, and make this host
(kopia.user@kopia.host) the maintenance owner, as "kopia repository
create" does. The location must be empty; to use a repository that exists,
run "vmhistory repo connect".

The repository is encrypted with the password (see "vmhistory repo
--help"); create the password file first.`,
		Example: `  (umask 077; head -c 30 /dev/urandom | base64 > /etc/vmhistory/kopia.password)
  vmhistory repo create filesystem --path /srv/kopia
  vmhistory repo create gdrive --folder-id 1AbCdEfGhIjKlMnOpQrStUvWxYz --credentials-file /etc/vmhistory/gdrive-sa.json
  KOPIA_PASSWORD=... vmhistory repo create webdav --url https://dav.example.com/kopia/ --username backup`,
	}
	for _, b := range repoBackends {
		cmd.AddCommand(newRepoBackendCommand(opts, b, true))
	}
	return cmd
}

func newRepoConnectCommand(opts *globalOptions) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "connect BACKEND [flags]",
		Short: "Connect to an existing kopia repository",
		Long: `Connect to an existing kopia repository: check the password, and write
kopia.config_file. The repository may have been made by vmhistory, by
kopia's own CLI or on another host. If it has no maintenance owner yet,
this host becomes it; --take-maintenance takes it from another client
(only one client should run maintenance).`,
		Example: `  vmhistory repo connect filesystem --path /srv/kopia
  vmhistory repo connect sftp --host backup.example.com --username kopia --path /srv/kopia --keyfile /root/.ssh/id_ed25519 --known-hosts /root/.ssh/known_hosts
  vmhistory repo connect gdrive --folder-id 1AbCdEfGhIjKlMnOpQrStUvWxYz --credentials-file /etc/vmhistory/gdrive-sa.json --take-maintenance`,
	}
	for _, b := range repoBackends {
		cmd.AddCommand(newRepoBackendCommand(opts, b, false))
	}
	return cmd
}

func newRepoBackendCommand(opts *globalOptions, b repoBackend, create bool) *cobra.Command {
	verb := "connect"
	if create {
		verb = "create"
	}
	var cf repoConnectFlags
	cmd := &cobra.Command{
		Use:     b.name,
		Short:   strings.ToUpper(verb[:1]) + verb[1:] + " a repository in " + b.short,
		Long:    b.long,
		Example: "  vmhistory repo " + verb + " " + b.name + " " + b.example,
		Args:    cobra.NoArgs,
	}
	specFn := b.flags(cmd.Flags())
	cf.register(cmd.Flags(), create)
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		// create and connect write kopia.config_file, so the file cannot
		// exist yet: the full check ("kopia.config_file does not exist")
		// would refuse every first run. The checks of other files the
		// configuration names (ssh keys, zfs, metrics directory) do not
		// matter here either. The password file is checked when it is read.
		cfg, err := config.Options{SkipFileChecks: true}.Load(opts.configPath)
		if err != nil {
			return reportConfigProblems(cmd, err)
		}
		k, err := kopiaSection(cfg, opts)
		if err != nil {
			return err
		}
		spec, err := specFn()
		if err != nil {
			return err
		}
		pw, _, err := kopiarepo.ResolvePassword(cf.passwordFile, k.PasswordFile)
		if err != nil {
			if create && errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("%w\ncreate the password first, e.g.: (umask 077; head -c 30 /dev/urandom | base64 > %s)", err, k.PasswordFile)
			}
			return err
		}
		co := kopiarepo.ConnectOptions{
			Host: k.Host, User: k.User,
			CacheDirectory:  cf.cacheDirectory,
			Overwrite:       cf.overwrite,
			TakeMaintenance: cf.takeMaintenance,
		}
		ctx := cmd.Context()
		if create {
			err = kopiarepo.Create(ctx, spec, k.ConfigFile, pw, kopiarepo.CreateOptions{ConnectOptions: co, Splitter: cf.splitter})
		} else {
			err = kopiarepo.Connect(ctx, spec, k.ConfigFile, pw, co)
		}
		if err != nil {
			return err
		}
		st, err := repoStatus(cmd, k.ConfigFile, pw)
		if err != nil {
			return err
		}
		if opts.jsonOutput {
			return writeIndentedJSON(cmd.OutOrStdout(), st)
		}
		done := "Connected to"
		if create {
			done = "Created and connected to"
		}
		fmt.Fprintf(cmd.OutOrStdout(), "%s the kopia repository in %s; %s written.\n\n", done, st.Storage, k.ConfigFile)
		printRepoStatus(cmd.OutOrStdout(), st)
		return nil
	}
	return cmd
}

func newRepoStatusCommand(opts *globalOptions) *cobra.Command {
	var passwordFile string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show the kopia repository, its maintenance and its sources",
		Long: `Show the kopia repository kopia.config_file connects to: where it is, its
format, who runs its maintenance and when, the compression and splitter in
effect, and every snapshot source with its number of snapshots and the
newest.

A policy that compresses with an algorithm kopia deprecates (lz4, which
can write data kopia fails to decompress, or zstd-best-compression), set
by vmhistory or by kopia's CLI, is a warning on stderr (and in --json's
"warnings"); the exit status stays 0.

A repository that cannot be opened (unreachable storage, wrong password)
is an error, with exit status 1.`,
		Example: `  vmhistory repo status
  vmhistory repo status --json | jq -r '.sources[] | "\(.path) \(.snapshots)"'`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			// Everything here needs kopia: its files are checked with the
			// rest of the configuration, and named at their lines.
			cfg, err := config.Load(opts.configPath)
			if err != nil {
				return reportConfigProblems(cmd, err)
			}
			k, err := kopiaSection(cfg, opts)
			if err != nil {
				return err
			}
			pw, _, err := kopiarepo.ResolvePassword(passwordFile, k.PasswordFile)
			if err != nil {
				return err
			}
			st, err := repoStatus(cmd, k.ConfigFile, pw)
			if err != nil {
				return err
			}
			for _, w := range st.Warnings {
				fmt.Fprintln(cmd.ErrOrStderr(), "warning: "+w)
			}
			if opts.jsonOutput {
				return writeIndentedJSON(cmd.OutOrStdout(), st)
			}
			printRepoStatus(cmd.OutOrStdout(), st)
			return nil
		},
	}
	cmd.Flags().StringVar(&passwordFile, "password-file", "", "file holding the repository password (mode 600); default kopia.password_file, or $KOPIA_PASSWORD when set")
	return cmd
}

// kopiaSection returns the configuration's kopia section, or explains
// that there is none.
func kopiaSection(cfg *config.Config, opts *globalOptions) (*config.Kopia, error) {
	if cfg.Kopia == nil {
		return nil, fmt.Errorf("%s has no kopia section: add one with at least config_file and password_file (see \"vmhistory config example\")", opts.configPath)
	}
	return cfg.Kopia, nil
}

func repoStatus(cmd *cobra.Command, configFile, password string) (*kopiarepo.Status, error) {
	ctx := cmd.Context()
	r, err := kopiarepo.Open(ctx, configFile, password)
	if err != nil {
		return nil, err
	}
	defer r.Close(ctx)
	return r.Status(ctx)
}

func printRepoStatus(w io.Writer, st *kopiarepo.Status) {
	row := func(k, f string, a ...any) { fmt.Fprintf(w, "%-15s %s\n", k+":", fmt.Sprintf(f, a...)) }
	row("Repository", "%s", st.Storage)
	row("Config file", "%s", st.ConfigFile)
	ident := st.Identity
	if st.ReadOnly {
		ident += " (read-only)"
	}
	row("Connected as", "%s", ident)
	if st.UniqueID != "" {
		row("Format", "version %d, hash %s, encryption %s, default splitter %s", st.FormatVersion, st.Hash, st.Encryption, st.Splitter)
	}
	if st.CacheDirectory != "" {
		row("Cache", "%s", st.CacheDirectory)
	}
	m := st.Maintenance
	switch {
	case m.Owner == "":
		row("Maintenance", "nobody owns it: nothing deletes expired data; run \"vmhistory repo connect ... --take-maintenance\"")
	case !m.Owned:
		row("Maintenance", "owned by %s, not this host (%s): this host's uploads do not run it", m.Owner, st.Identity)
	default:
		row("Maintenance", "owned by this host (%s); last run %s, next quick %s, next full %s",
			m.Owner, when(m.LastRun, "never"), when(m.NextQuick, "now"), when(m.NextFull, "now"))
	}
	row("Global policy", "compression %s, splitter %s", st.GlobalPolicy.Compression, orRepoDefault(st.GlobalPolicy.Splitter))
	if len(st.Sources) == 0 {
		row("Sources", "none yet")
		return
	}
	row("Sources", "%d", len(st.Sources))
	for _, s := range st.Sources {
		latest := "none"
		if !s.Latest.IsZero() {
			latest = s.Latest.Local().Format(time.DateTime)
		}
		fmt.Fprintf(w, "  %s\n    %d snapshots, newest %s; compression %s, splitter %s\n",
			s, s.Snapshots, latest, s.Policy.Compression, orRepoDefault(s.Policy.Splitter))
	}
}

func when(t time.Time, zero string) string {
	if t.IsZero() {
		return zero
	}
	return t.Local().Format(time.DateTime)
}

func orRepoDefault(s string) string {
	if s == "" {
		return "repository default"
	}
	return s
}
