// Command testlog turns "go test -json" on stdin into a log that proves
// what ran: one line per top-level test that passed (name and time), the
// whole output of every test that failed or was skipped (a skip must say
// why), the package lines go test prints, then the last lines of each
// failed test again (a long log is often seen only by its end, where a
// failure in its middle would be lost), and a closing count. It exits 1
// when a test or a package failed, so CI cannot pass on a failure that
// scrolled by.
//
//	go test -json ./... | go run ./scripts/testlog
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strings"
)

// event is one line of "go test -json" (see "go doc test2json").
type event struct {
	Action     string
	Package    string
	ImportPath string
	Test       string
	Elapsed    float64
	Output     string
}

type testKey struct{ pkg, test string }

func main() {
	passed, failed, skipped, err := summarize(os.Stdin, os.Stdout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "testlog:", err)
		os.Exit(2)
	}
	fmt.Printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped)
	if failed > 0 {
		os.Exit(1)
	}
}

// tailLines and tailWidth bound what the closing summary repeats of each
// failed test: its last lines, each cut to a width.
const (
	tailLines = 15
	tailWidth = 400
)

func summarize(in io.Reader, out io.Writer) (passed, failed, skipped int, err error) {
	outputs := map[testKey]*strings.Builder{}
	var tails []string // of the failed tests, for the closing summary
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 64<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if json.Unmarshal(line, &e) != nil {
			// Not an event (a build error printed before -json took
			// over): show it as it is.
			fmt.Fprintln(out, string(line))
			continue
		}
		switch {
		case e.Action == "build-output":
			fmt.Fprint(out, e.Output)
		case e.Action == "build-fail":
			fmt.Fprintf(out, "FAIL\t%s [build failed]\n", e.ImportPath)
			failed++
		case e.Test == "":
			if e.Action == "output" && !strings.HasPrefix(e.Output, "PASS\n") && !strings.HasPrefix(e.Output, "=== ") {
				fmt.Fprint(out, e.Output)
			}
			if e.Action == "fail" {
				failed++ // a package that failed outside any test (TestMain, a panic, a timeout)
			}
		case e.Action == "output":
			k := testKey{e.Package, e.Test}
			if outputs[k] == nil {
				outputs[k] = &strings.Builder{}
			}
			outputs[k].WriteString(e.Output)
		case e.Action == "pass" || e.Action == "fail" || e.Action == "skip":
			k := testKey{e.Package, e.Test}
			topLevel := !strings.Contains(e.Test, "/")
			switch e.Action {
			case "pass":
				if topLevel {
					passed++
					fmt.Fprintf(out, "--- PASS: %s %s (%.2fs)\n", e.Package, e.Test, e.Elapsed)
				}
			case "fail":
				if topLevel {
					failed++
				}
				text := outputText(outputs[k])
				fmt.Fprintf(out, "--- FAIL: %s %s (%.2fs)\n%s", e.Package, e.Test, e.Elapsed, text)
				tails = append(tails, fmt.Sprintf("--- FAIL: %s %s, its last lines:\n%s", e.Package, e.Test, tail(text)))
			case "skip":
				skipped++
				fmt.Fprintf(out, "--- SKIP: %s %s\n%s", e.Package, e.Test, outputText(outputs[k]))
			}
			delete(outputs, k)
		}
	}
	if err := sc.Err(); err != nil {
		return passed, failed, skipped, err
	}
	if len(tails) > 0 {
		fmt.Fprintf(out, "\n=== the failed tests again, the end of each one's output:\n%s", strings.Join(tails, ""))
	}
	return passed, failed, skipped, nil
}

// tail is the last tailLines lines of text, each at most tailWidth bytes.
func tail(text string) string {
	lines := strings.Split(strings.TrimRight(text, "\n"), "\n")
	lines = lines[max(len(lines)-tailLines, 0):]
	for i, l := range lines {
		if len(l) > tailWidth {
			lines[i] = l[:tailWidth] + " […]"
		}
	}
	return strings.Join(lines, "\n") + "\n"
}

func outputText(b *strings.Builder) string {
	if b == nil {
		return ""
	}
	var kept []string
	for line := range strings.SplitSeq(b.String(), "\n") {
		if strings.HasPrefix(line, "=== ") || line == "" {
			continue
		}
		kept = append(kept, line)
	}
	if len(kept) == 0 {
		return ""
	}
	return strings.Join(kept, "\n") + "\n"
}
