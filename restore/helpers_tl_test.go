package restore_test

import "github.com/vmhistory/vmhistory/runner"

func runnerCmd(args ...string) runner.Cmd { return runner.Cmd{Args: args} }
