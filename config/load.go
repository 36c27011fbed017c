package config

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Options changes what Load and Parse check. The zero value checks
// everything, which is what every command that acts on the configuration
// should use.
type Options struct {
	// SkipFileChecks leaves out the checks that look at this machine: that
	// the kopia password file and ssh identity exist and are private, that
	// known_hosts and the kopia repository config exist, that the metrics
	// directory exists and that zfs.binary is found. Everything that can be
	// judged from the file alone is still checked. Use it to check a file
	// written for another host ("vmhistory config check --skip-files").
	SkipFileChecks bool
	// SkipKopiaFileChecks leaves out the checks of the kopia password file
	// and repository config. The commands that use the repository check
	// them when they open it, so that a kopia problem fails only what needs
	// kopia (the upload step, the kopia source of the timeline) instead of
	// every command: a snapshot must still be taken and replicated, and a
	// local snapshot restored, with the repository's password file wrong.
	SkipKopiaFileChecks bool
}

// Notes is what a check found besides the configuration itself: warnings
// (a state the file is fine with but the admin should know of, such as a
// kopia repository not created yet), and where each key was, so that a
// check made later (a dataset missing on this host) is reported at its
// line like the file's own problems.
type Notes struct {
	// Warnings are reported in the file:line form of Errors.
	Warnings Errors
	lines    map[string]int
	// datasetKeys is the key of each dataset's name: datasets[0] for a
	// plain name, datasets[0].name for a mapping.
	datasetKeys []string
}

// Problem is a problem with key's value, at key's line (or its section's).
func (n *Notes) Problem(key, value, format string, args ...any) FieldError {
	line := 0
	for k := key; k != "" && line == 0; k = parentKey(k) {
		line = n.lines[k]
	}
	return FieldError{Key: key, Value: value, Line: line, Message: fmt.Sprintf(format, args...)}
}

// DatasetKey is the key of the i-th dataset's name, for Problem.
func (n *Notes) DatasetKey(i int) string {
	if i < len(n.datasetKeys) {
		return n.datasetKeys[i]
	}
	return indexKey("datasets", i)
}

// Load reads, parses and validates the configuration file at path with
// every check. On failure the error is an *Errors listing every problem.
func Load(path string) (*Config, error) { return Options{}.Load(path) }

// Parse parses and validates a configuration held in memory, with every
// check; name is used in messages in place of a file name.
func Parse(data []byte, name string) (*Config, error) { return Options{}.Parse(data, name) }

// Load reads, parses and validates the configuration file at path. On
// failure the error is an *Errors; a file that cannot be read gives one
// problem wrapping the os error (errors.Is(err, fs.ErrNotExist) works).
func (o Options) Load(path string) (*Config, error) {
	cfg, _, err := o.LoadNotes(path)
	return cfg, err
}

// LoadNotes is Load that also returns the Notes of a valid file.
func (o Options) LoadNotes(path string) (*Config, *Notes, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		var msg string
		switch {
		case errors.Is(err, os.ErrNotExist):
			msg = `the configuration file does not exist; "vmhistory config example" prints a commented one to start from, and --config chooses another file`
		case errors.Is(err, os.ErrPermission):
			msg = "the configuration file cannot be read: permission denied (run as root?)"
		default:
			msg = "the configuration file cannot be read: " + unwrapPathError(err).Error()
		}
		return nil, nil, &Errors{File: path, Problems: []FieldError{{Message: msg, Err: err}}}
	}
	return o.ParseNotes(data, path)
}

func unwrapPathError(err error) error {
	var pe *os.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// Parse parses and validates a configuration held in memory; name is used
// in messages in place of a file name. It returns a resolved Config (see
// the package documentation), or nil and an *Errors listing every problem
// in line order.
func (o Options) Parse(data []byte, name string) (*Config, error) {
	cfg, _, err := o.ParseNotes(data, name)
	return cfg, err
}

// ParseNotes is Parse that also returns the Notes of a valid file.
func (o Options) ParseNotes(data []byte, name string) (*Config, *Notes, error) {
	errs := &Errors{File: name}
	doc := parseDocument(data, errs)
	if doc == nil {
		return nil, nil, errs
	}
	notes := &Notes{Warnings: Errors{File: name}, lines: map[string]int{}}
	cfg := Default()
	d := newDecoder(errs)
	d.decode("", doc, 0, reflect.ValueOf(cfg).Elem())
	if !d.failed[""] {
		// A file that is not a mapping at all has told us nothing to validate.
		v := &validator{d: d, cfg: cfg, opts: o, notes: notes}
		v.run()
		v.fileChecks()
	}
	if len(errs.Problems) > 0 {
		sort.SliceStable(errs.Problems, func(i, j int) bool { return errs.Problems[i].Line < errs.Problems[j].Line })
		return nil, nil, errs
	}
	for k, p := range d.seen {
		notes.lines[k] = p.line
	}
	for i := range cfg.Datasets {
		key := indexKey("datasets", i)
		if !d.plain[key] {
			key = joinKey(key, "name")
		}
		notes.datasetKeys = append(notes.datasetKeys, key)
	}
	return cfg, notes, nil
}

// parseDocument parses data into the node of its single YAML document, or
// reports why it cannot and returns nil.
func parseDocument(data []byte, errs *Errors) *yaml.Node {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var root yaml.Node
	err := dec.Decode(&root)
	if errors.Is(err, io.EOF) {
		errs.addf("", "", 0, `the file is empty; "vmhistory config example" prints a commented configuration to start from`)
		return nil
	}
	if err != nil {
		errs.add(syntaxError(err, data))
		return nil
	}
	var extra yaml.Node
	switch err := dec.Decode(&extra); {
	case err == nil:
		errs.addf("", "", extra.Line, "a second YAML document starts here (---); put the whole configuration in one document")
		return nil
	case !errors.Is(err, io.EOF):
		errs.add(syntaxError(err, data))
		return nil
	}
	doc := &root
	if doc.Kind == yaml.DocumentNode && len(doc.Content) > 0 {
		doc = doc.Content[0]
	}
	if doc.Kind == yaml.DocumentNode || isNull(doc) {
		errs.addf("", "", 0, `the file holds no settings; "vmhistory config example" prints a commented configuration to start from`)
		return nil
	}
	return doc
}

var yamlLineError = regexp.MustCompile(`^yaml: line (\d+): (.*)$`)

// syntaxError turns a YAML parser error into a problem at its line, with a
// hint for the mistake everybody makes once: indenting with a tab.
func syntaxError(err error, data []byte) FieldError {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	line := 0
	if m := yamlLineError.FindStringSubmatch(err.Error()); m != nil {
		line, _ = strconv.Atoi(m[1])
		msg = m[2]
	}
	if line > 0 {
		lines := bytes.Split(data, []byte("\n"))
		for _, l := range []int{line - 1, line} { // the parser sometimes blames the next line
			if l >= 1 && l <= len(lines) && bytes.HasPrefix(bytes.TrimLeft(lines[l-1], " "), []byte("\t")) {
				msg += "; YAML cannot be indented with tabs, use spaces"
				break
			}
		}
	}
	return FieldError{Line: line, Message: "invalid YAML: " + msg, Err: err}
}
