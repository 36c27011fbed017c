package kopiarepo

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"
)

// ReadPasswordFile returns the repository password held in a file: its
// content without the trailing line break(s). A password file readable by
// group or other is refused: it would hand the repository's encryption key
// to every local user.
func ReadPasswordFile(path string) (string, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return "", fmt.Errorf("repository password file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return "", fmt.Errorf("repository password file %s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&0o066 != 0 {
		return "", fmt.Errorf("repository password file %s is readable or writable by group or other (mode %04o); run: chmod 600 %s", path, perm, path)
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("repository password file: %w", err)
	}
	pw := strings.TrimRight(string(data), "\r\n")
	if pw == "" {
		return "", fmt.Errorf("repository password file %s is empty", path)
	}
	return pw, nil
}

// ResolvePassword finds the repository password, never from a command-line
// argument: the file named by flagFile when set (a --password-file flag),
// else the environment variable KOPIA_PASSWORD when set, else
// configFile (kopia.password_file from vmhistory's configuration). It also
// says where the password came from, for messages.
func ResolvePassword(flagFile, configFile string) (password, source string, err error) {
	if flagFile != "" {
		pw, err := ReadPasswordFile(flagFile)
		return pw, flagFile, err
	}
	if pw, ok := os.LookupEnv(PasswordEnv); ok {
		if pw == "" {
			return "", "", fmt.Errorf("%s is set but empty", PasswordEnv)
		}
		return pw, "$" + PasswordEnv, nil
	}
	if configFile != "" {
		pw, err := ReadPasswordFile(configFile)
		if errors.Is(err, fs.ErrNotExist) {
			err = missingPasswordError{fmt.Sprintf("repository password file %s does not exist, and $%s is not set to stand in for it", configFile, PasswordEnv)}
		}
		return pw, configFile, err
	}
	return "", "", errors.New("no repository password: set kopia.password_file in the configuration, pass --password-file, or set " + PasswordEnv)
}

// missingPasswordError is a password file that does not exist, said in
// words, for which errors.Is(err, fs.ErrNotExist) still holds.
type missingPasswordError struct{ msg string }

func (e missingPasswordError) Error() string { return e.msg }
func (e missingPasswordError) Unwrap() error { return fs.ErrNotExist }
