package main

import (
	"encoding/json"
	"strings"
	"testing"
)

// A command line that does not fit the command points to its --help.
func TestUsageErrorsPointToHelp(t *testing.T) {
	for _, tc := range []struct {
		args []string
		err  string
		hint string
	}{
		{[]string{"timeline", "ls"}, "accepts 1 arg(s), received 0", "vmhistory timeline ls"},
		{[]string{"restore", "latest:images/x"}, "accepts 2 arg(s), received 1", "vmhistory restore"},
		{[]string{"backup", "--no-such-flag"}, "unknown flag: --no-such-flag", "vmhistory backup"},
		{[]string{"backup", "tonight"}, `unknown command "tonight" for "vmhistory backup"`, "vmhistory backup"},
		{[]string{"no-such-command"}, `unknown command "no-such-command" for "vmhistory"`, "vmhistory"},
		{[]string{"bench", "compression"}, `required flag(s) "data-file" not set`, "vmhistory bench compression"},
		{[]string{"restore", "--parallel", "many", "a:b", "c"}, "invalid argument", "vmhistory restore"},
	} {
		_, stderr, code := runChild(t, nil, tc.args...)
		want := "vmhistory: " + tc.err
		hint := "Run '" + tc.hint + " --help' for usage.\n"
		if code == 0 || !strings.Contains(stderr, want) || !strings.HasSuffix(stderr, hint) || strings.Count(stderr, "\n") != 2 {
			t.Errorf("vmhistory %v: status %d, stderr %q; want %q then %q", tc.args, code, stderr, want, hint)
		}
	}
	// An error that is not about the command line gets no hint.
	_, stderr, _ := runChild(t, nil, "timeline", "--config", "/nonexistent/config.yaml")
	if strings.Contains(stderr, "--help' for usage") {
		t.Errorf("a missing configuration got a usage hint: %q", stderr)
	}
}

// vmhistory --version prints what vmhistory version prints.
func TestVersionFlag(t *testing.T) {
	for _, asJSON := range []bool{false, true} {
		extra := []string{}
		if asJSON {
			extra = append(extra, "--json")
		}
		flag, stderr, code := runChild(t, nil, append([]string{"--version"}, extra...)...)
		if code != 0 || stderr != "" {
			t.Fatalf("--version: status %d, stderr %q", code, stderr)
		}
		sub, _, _ := runChild(t, nil, append([]string{"version"}, extra...)...)
		if flag != sub || !strings.Contains(flag, version) {
			t.Errorf("--version printed %q, version %q", flag, sub)
		}
	}
	// Without a command or flag, the help as before.
	if stdout, _, code := runChild(t, nil); code != 0 || !strings.Contains(stdout, "Available Commands:") {
		t.Errorf("vmhistory alone: status %d\n%s", code, stdout)
	}
}

// timeline ls --json gives each entry's type, its mode as ls shows it and
// its permissions in octal, not Go's FileMode number.
func TestTimelineLsJSONTypeAndMode(t *testing.T) {
	sb := newRestoreSandbox(t)
	for _, tc := range []struct{ spec, name, typ, mode, perm string }{
		{"latest", "images", "dir", "drwxr-xr-x", "0755"},
		{"latest:images", "vm.img", "file", "-rw-r-----", "0640"},
	} {
		stdout, stderr, err := runConfigCmd(t, "timeline", "ls", tc.spec, "--json", "--config", sb.config)
		if err != nil {
			t.Fatalf("timeline ls %s --json: %v\n%s", tc.spec, err, stderr)
		}
		var list []map[string]any
		if err := json.Unmarshal([]byte(stdout), &list); err != nil {
			t.Fatalf("%v\n%s", err, stdout)
		}
		found := false
		for _, e := range list {
			if e["name"] == tc.name {
				found = true
				if e["type"] != tc.typ || e["mode"] != tc.mode || e["perm"] != tc.perm {
					t.Errorf("timeline ls %s --json: %v, want type %s mode %s perm %s", tc.spec, e, tc.typ, tc.mode, tc.perm)
				}
			}
		}
		if !found {
			t.Errorf("timeline ls %s --json lacks %s:\n%s", tc.spec, tc.name, stdout)
		}
	}
}
