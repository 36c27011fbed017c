package testenv_test

import (
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/vmhistory/vmhistory/testenv"
)

func TestWebDAVStopStart(t *testing.T) {
	w := testenv.StartWebDAV(t)
	do := func(method, body string) (int, string, error) {
		req, err := http.NewRequest(method, w.URL+"hello.txt", strings.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		req.SetBasicAuth(w.Username, w.Password)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), nil
	}
	if code, _, err := do(http.MethodPut, "hello"); err != nil || code/100 != 2 {
		t.Fatalf("PUT: %d %v", code, err)
	}
	// Without credentials the server refuses.
	if resp, err := http.Get(w.URL + "hello.txt"); err != nil || resp.StatusCode != http.StatusUnauthorized {
		t.Errorf("GET without auth: %v %v, want 401", resp, err)
	}

	w.Stop()
	if w.Running() {
		t.Error("Running after Stop")
	}
	if _, _, err := do(http.MethodGet, ""); err == nil || !strings.Contains(err.Error(), "connection refused") {
		t.Errorf("GET while stopped: %v, want connection refused", err)
	}

	w.Start()
	code, body, err := do(http.MethodGet, "")
	if err != nil || code != http.StatusOK || body != "hello" {
		t.Fatalf("GET after restart: %d %q %v", code, body, err)
	}
}
