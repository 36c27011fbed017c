package main

import (
	"strings"
	"testing"
)

func TestSummarizeCountsAndShowsFailures(t *testing.T) {
	in := strings.Join([]string{
		`{"Action":"run","Package":"p","Test":"TestA"}`,
		`{"Action":"output","Package":"p","Test":"TestA","Output":"=== RUN   TestA\n"}`,
		`{"Action":"output","Package":"p","Test":"TestA","Output":"    a_test.go:3: noise of a passing test\n"}`,
		`{"Action":"pass","Package":"p","Test":"TestA","Elapsed":0.5}`,
		`{"Action":"output","Package":"p","Test":"TestB/sub","Output":"    b_test.go:9: want 2, got 3\n"}`,
		`{"Action":"fail","Package":"p","Test":"TestB/sub","Elapsed":0.1}`,
		`{"Action":"fail","Package":"p","Test":"TestB","Elapsed":0.2}`,
		`{"Action":"output","Package":"p","Test":"TestC","Output":"    c_test.go:1: needs libvirtd\n"}`,
		`{"Action":"skip","Package":"p","Test":"TestC"}`,
		`{"Action":"output","Package":"p","Output":"FAIL\tp\t1.0s\n"}`,
		`{"Action":"fail","Package":"p","Elapsed":1}`,
		`{"ImportPath":"q","Action":"build-output","Output":"q/x.go:1: syntax error\n"}`,
		`{"ImportPath":"q","Action":"build-fail"}`,
	}, "\n")
	var out strings.Builder
	passed, failed, skipped, err := summarize(strings.NewReader(in), &out)
	if err != nil {
		t.Fatal(err)
	}
	// TestB, package p outside tests, package q's build.
	if passed != 1 || failed != 3 || skipped != 1 {
		t.Errorf("passed %d failed %d skipped %d, want 1 3 1", passed, failed, skipped)
	}
	got := out.String()
	for _, want := range []string{"--- PASS: p TestA (0.50s)", "--- FAIL: p TestB/sub", "want 2, got 3", "--- SKIP: p TestC", "needs libvirtd", "FAIL\tp\t1.0s", "syntax error", "FAIL\tq [build failed]"} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}
	if i := strings.LastIndex(got, "want 2, got 3"); i < strings.Index(got, "FAIL\tq [build failed]") {
		t.Errorf("the failure is not repeated at the end:\n%s", got)
	}
	if strings.Contains(got, "noise of a passing test") {
		t.Errorf("a passing test's log is shown:\n%s", got)
	}
}
