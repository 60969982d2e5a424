package lab

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"
)

// Proc is a long-running process started in a namespace, in its own process
// group, with stdout and stderr going to a log file under the lab dir.
type Proc struct {
	name    string
	cmd     *exec.Cmd
	logPath string
	done    chan struct{}
	err     error // set before done is closed
}

var unsafeChars = regexp.MustCompile(`[^A-Za-z0-9_.-]+`)

// Start starts args in the namespace. The process is killed with its process
// group when ctx is done, on Proc.Kill/Stop, and on Lab.Close; unless the lab is
// Detached also when the creating process dies.
func (ns *Netns) Start(ctx context.Context, args ...string) (*Proc, error) {
	return ns.StartEnv(ctx, nil, args...)
}

// StartEnv is Start with extra environment variables ("KEY=value").
func (ns *Netns) StartEnv(ctx context.Context, env []string, args ...string) (*Proc, error) {
	if len(args) == 0 {
		return nil, errors.New("lab: Start: no command")
	}
	l := ns.lab
	l.mu.Lock()
	if err := l.checkOpen(); err != nil {
		l.mu.Unlock()
		return nil, err
	}
	l.procSeq++
	seq := l.procSeq
	l.mu.Unlock()

	name := fmt.Sprintf("%s.%s.%d", ns.name, unsafeChars.ReplaceAllString(filepath.Base(args[0]), "_"), seq)
	logPath := filepath.Join(l.dir, "logs", name+".log")
	f, err := os.OpenFile(logPath, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	defer f.Close() // the child has its own copy
	cmd := ns.Command(ctx, args...)
	cmd.Env = append(cmd.Env, env...)
	cmd.Stdout = f
	cmd.Stderr = f
	fmt.Fprintf(f, "# %s in %s at %s\n", strings.Join(args, " "), ns.full, time.Now().Format(time.RFC3339Nano))

	p := &Proc{name: name, cmd: cmd, logPath: logPath, done: make(chan struct{})}
	l.mu.Lock()
	if err := l.checkOpen(); err != nil {
		l.mu.Unlock()
		return nil, err
	}
	if err := StartCommand(cmd); err != nil {
		l.mu.Unlock()
		return nil, fmt.Errorf("lab: start %q in %s: %w", strings.Join(args, " "), ns.full, err)
	}
	l.procs = append(l.procs, p)
	l.mu.Unlock()
	go func() {
		p.err = cmd.Wait()
		close(p.done)
	}()
	return p, nil
}

// Name identifies the process in the lab: "<netns>.<command>.<n>".
func (p *Proc) Name() string { return p.name }

// Pid returns the process id (also its process group id).
func (p *Proc) Pid() int { return p.cmd.Process.Pid }

// Done is closed when the process has exited and been reaped.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Exited reports whether the process has exited.
func (p *Proc) Exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// Wait waits for the process to exit and returns its exit error (nil for
// status 0). It can be called any number of times.
func (p *Proc) Wait() error {
	<-p.done
	return p.err
}

// Signal sends sig to the process group.
func (p *Proc) Signal(sig syscall.Signal) error {
	if err := syscall.Kill(-p.Pid(), sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("lab: signal %v to %s: %w", sig, p.name, err)
	}
	return nil
}

// Kill sends SIGKILL to the process group and waits for the process to exit.
// Killing an exited process is not an error.
func (p *Proc) Kill() error {
	if err := p.Signal(syscall.SIGKILL); err != nil {
		return err
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(10 * time.Second):
		return fmt.Errorf("lab: %s (pid %d) did not exit 10s after SIGKILL", p.name, p.Pid())
	}
}

// Stop sends SIGTERM to the process group and, if the process has not exited
// within 5 seconds, SIGKILL. See StopTimeout.
func (p *Proc) Stop() error { return p.StopTimeout(5 * time.Second) }

// StopTimeout sends SIGTERM to the process group and waits up to d; then it
// kills the group and returns an error saying so. A process that exits after
// SIGTERM with a non-zero status is not an error here (see Wait).
func (p *Proc) StopTimeout(d time.Duration) error {
	if p.Exited() {
		return p.Signal(syscall.SIGKILL) // stragglers in the group
	}
	if err := p.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	select {
	case <-p.done:
		return p.Signal(syscall.SIGKILL)
	case <-time.After(d):
	}
	if err := p.Kill(); err != nil {
		return err
	}
	return fmt.Errorf("lab: %s (pid %d) did not exit within %v of SIGTERM; killed", p.name, p.Pid(), d)
}

// LogPath returns the file that holds the process's stdout and stderr.
func (p *Proc) LogPath() string { return p.logPath }

// Log returns the process's output so far.
func (p *Proc) Log() string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return fmt.Sprintf("(log unreadable: %v)", err)
	}
	return string(b)
}
