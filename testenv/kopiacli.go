package testenv

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
)

// KopiaCLI builds the kopia CLI from the kopia module vmhistory links (the
// same version as the library) into the test's temp dir, or returns the
// binary named by $VMHISTORY_KOPIA_CLI. The first build on a machine takes
// a minute or two; later ones come from Go's build cache in seconds.
func KopiaCLI(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("VMHISTORY_KOPIA_CLI"); p != "" {
		return p
	}
	bin := filepath.Join(t.TempDir(), "kopia")
	goTool := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(goTool); err != nil {
		goTool = "go"
	}
	out, err := exec.Command(goTool, "build", "-o", bin, "github.com/kopia/kopia").CombinedOutput()
	if err != nil {
		t.Fatalf("go build github.com/kopia/kopia: %v\n%s", err, out)
	}
	return bin
}
