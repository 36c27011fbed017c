package config

import (
	"fmt"
	"strconv"
	"strings"
)

// FieldError is one problem in a configuration file. It names the key the
// way the user would find it in the file: a dotted path with list indexes
// ("kopia.password_file", "datasets[1].name"), the value found there and the
// line, so that the message can be acted on without reading any code.
type FieldError struct {
	// Key is the dotted path of the offending key, "" for a problem with the
	// file as a whole (unreadable, empty, not YAML).
	Key string `json:"key,omitempty"`
	// Value is the value found at Key as written in the file (or the default
	// that was filled in), "" when there is none worth showing (a missing key,
	// a mapping).
	Value string `json:"value,omitempty"`
	// Line is the 1-based line in the file, 0 when the key is not in the file
	// (a missing required key reports the line of its section when it can).
	Line int `json:"line,omitempty"`
	// Message says what is wrong and, where there is one, how to fix it.
	Message string `json:"message"`
	// Err is the underlying error, when there is one (reading the file).
	Err error `json:"-"`
}

// String renders the problem without the file name:
//
//	12: keep_local: "-3" must be at least 1
func (e FieldError) String() string {
	var b strings.Builder
	if e.Line > 0 {
		b.WriteString(strconv.Itoa(e.Line))
		b.WriteString(": ")
	}
	if e.Key != "" {
		b.WriteString(escapeControls(e.Key))
		b.WriteString(": ")
	}
	if e.Value != "" {
		b.WriteString(strconv.Quote(e.Value))
		b.WriteString(" ")
	}
	b.WriteString(escapeControls(e.Message))
	return b.String()
}

// escapeControls writes control characters as Go escapes (\n, \x00): keys
// and messages quote what the user wrote, and a problem must stay one line
// whatever that was.
func escapeControls(s string) string {
	if !strings.ContainsFunc(s, isControl) {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		if isControl(r) {
			q := strconv.QuoteRune(r)
			b.WriteString(q[1 : len(q)-1])
			continue
		}
		b.WriteRune(r)
	}
	return b.String()
}

func isControl(r rune) bool { return r < 0x20 || r == 0x7f || r == 0x85 || r == 0x2028 || r == 0x2029 }

// Errors is every problem found in one configuration file. Parse and Load
// collect all of them before giving up, so that a sysadmin fixes a file in
// one round instead of one error per run.
type Errors struct {
	// File is the name the problems are reported against (the path given to
	// Load, the name given to Parse).
	File string `json:"file"`
	// Problems are in line order; those without a line (a missing key,
	// an unreadable file) come first.
	Problems []FieldError `json:"problems"`
}

// Error prints one line per problem, in the file:line: form editors and
// grep understand:
//
//	config.yaml:12: keep_local: "-3" must be at least 1
//	config.yaml:20: kopia.password_file: "/etc/x" is readable by group or other (mode 0644); run: chmod 600 /etc/x
func (e *Errors) Error() string {
	lines := e.Lines()
	return strings.Join(lines, "\n")
}

// Lines returns Error's lines, for printing one problem per line.
func (e *Errors) Lines() []string {
	lines := make([]string, 0, len(e.Problems))
	for _, p := range e.Problems {
		prefix := e.File
		if p.Line > 0 {
			prefix += ":" + strconv.Itoa(p.Line)
		}
		q := p
		q.Line = 0
		if prefix == "" {
			lines = append(lines, q.String())
		} else {
			lines = append(lines, prefix+": "+q.String())
		}
	}
	return lines
}

// Unwrap gives errors.Is and errors.As access to the underlying errors, such
// as fs.ErrNotExist when the configuration file is missing.
func (e *Errors) Unwrap() []error {
	var errs []error
	for _, p := range e.Problems {
		if p.Err != nil {
			errs = append(errs, p.Err)
		}
	}
	return errs
}

// Has reports whether some problem concerns key exactly; tests and callers
// that react to a specific key use it.
func (e *Errors) Has(key string) bool {
	for _, p := range e.Problems {
		if p.Key == key {
			return true
		}
	}
	return false
}

func (e *Errors) add(p FieldError) {
	e.Problems = append(e.Problems, p)
}

func (e *Errors) addf(key, value string, line int, format string, args ...any) {
	e.add(FieldError{Key: key, Value: value, Line: line, Message: fmt.Sprintf(format, args...)})
}
