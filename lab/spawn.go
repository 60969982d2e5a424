package lab

import (
	"bytes"
	"os/exec"
	"runtime"
	"sync"
)

// The lab's processes get SIGKILL when their parent dies (Pdeathsig, see
// Netns.Command), and Linux sends it when the parent *thread* exits, not
// the process. Go ends a thread whenever a goroutine exits while locked
// to it (as a goroutine that entered a namespace and does not come back
// does), and any thread may have started a lab process: such a process
// was killed at a random moment (an agent, in the middle of a benchmark).
// So every process starts from one thread that lives as long as the
// program: a goroutine locked to it for good, which starts each command
// it is handed and never enters a namespace.

type spawnRequest struct {
	cmd *exec.Cmd
	err chan error
}

var (
	spawnOnce sync.Once
	spawns    chan spawnRequest
)

// StartCommand runs cmd.Start on the lab's spawner thread: what a caller of
// Netns.Command does instead of cmd.Start.
func StartCommand(cmd *exec.Cmd) error {
	spawnOnce.Do(func() {
		spawns = make(chan spawnRequest)
		go func() {
			runtime.LockOSThread() // never unlocked: the thread must not be reused or end
			for r := range spawns {
				r.err <- r.cmd.Start()
			}
		}()
	})
	r := spawnRequest{cmd: cmd, err: make(chan error, 1)}
	spawns <- r
	return <-r.err
}

// CombinedOutput is cmd.CombinedOutput with cmd started on the spawner
// thread.
func CombinedOutput(cmd *exec.Cmd) ([]byte, error) {
	var b bytes.Buffer
	cmd.Stdout, cmd.Stderr = &b, &b
	err := StartCommand(cmd)
	if err == nil {
		err = cmd.Wait()
	}
	return b.Bytes(), err
}
