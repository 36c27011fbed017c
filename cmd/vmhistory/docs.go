package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"
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
			if err := doc.GenManTree(root, header, dir); err != nil {
				return fmt.Errorf("man: %w", err)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "manual pages written to %s\n", dir)
			return nil
		},
	}
}
