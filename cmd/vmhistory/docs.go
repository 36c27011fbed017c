package main

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"

	"github.com/vmhistory/vmhistory/safefile"
)

// newDocsCommand writes the manual pages, generated from the same help
// text --help prints, so the two never disagree.
func newDocsCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "man DIR",
		Short: "Write vmhistory's manual pages (vmhistory.1, vmhistory-backup.1, ...) into DIR",
		Long: `Write one manual page per command into DIR, from the same text --help
prints. "make install" puts them under /usr/local/share/man/man1.`,
		Example: `  vmhistory man /usr/local/share/man/man1 && mandb -q
  man vmhistory-backup`,
		Args:   cobra.ExactArgs(1),
		Hidden: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			dir := args[0]
			if fi, err := os.Stat(dir); err != nil || !fi.IsDir() {
				return fmt.Errorf("man: %s is not a directory", dir)
			}
			header := &doc.GenManHeader{Title: "VMHISTORY", Section: "1", Source: "vmhistory " + version, Manual: "vmhistory manual"}
			root := cmd.Root()
			root.DisableAutoGenTag = true
			if err := writeManTree(root, header, dir); err != nil {
				return fmt.Errorf("man: %w", err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "manual pages written to %s\n", dir)
			return nil
		},
	}
}

// writeManTree is doc.GenManTree, but each page is written with
// safefile.WriteFileAtomic: "make install" runs this as root into a
// directory where a planted symbolic link must not be followed.
func writeManTree(cmd *cobra.Command, header *doc.GenManHeader, dir string) error {
	for _, c := range cmd.Commands() {
		if !c.IsAvailableCommand() || c.IsAdditionalHelpTopicCommand() {
			continue
		}
		if err := writeManTree(c, header, dir); err != nil {
			return err
		}
	}
	var buf bytes.Buffer
	h := *header
	if err := doc.GenMan(cmd, &h, &buf); err != nil {
		return err
	}
	name := strings.ReplaceAll(cmd.CommandPath(), " ", "-") + "." + header.Section
	return safefile.WriteFileAtomic(filepath.Join(dir, name), buf.Bytes(), 0o644)
}
