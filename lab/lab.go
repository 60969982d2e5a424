// Package lab builds network topologies on one Linux host out of network
// namespaces and veth pairs: fabric routers, nodes that run real agents, pod
// namespaces, VMs and external peers, and the demo mesh of `isthmus lab up`
// (Up). The CLI, the end-to-end tests and the benchmarks use it; package
// labtest holds the glue for tests (testing.TB, building the binaries).
//
// Every name a lab creates carries its per-run prefix: Marker followed by four
// random base36 characters (for example "ilab3k9z"). Network namespaces are
// named "<prefix>-<name>", links in the host namespace "<prefix><suffix>", bpffs
// pin dirs /sys/fs/bpf/isthmus/<prefix>-<node>, and the run's temp dir
// "<tmp>/<prefix>-*". Parallel runs therefore never collide, and the leftovers
// of a crashed run can be found by name (CleanupPrefix, CleanupStale).
//
// Commands run in a namespace with `nsenter --net=<path>`, never with
// `ip netns exec`: the latter also unshares the mount namespace and remounts
// /sys, which hides the bpffs pins the agent keeps across restarts.
//
// Everything needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN).
package lab

import (
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"sort"
	"sync"
	"syscall"
)

const (
	// Marker starts every name a lab creates; CleanupAll removes everything
	// that carries it.
	Marker = "ilab"
	// NetnsDir is where named network namespaces are bind-mounted.
	NetnsDir = "/var/run/netns"
	// PinRoot is the parent of the agent's per-node bpffs pin dirs.
	PinRoot = "/sys/fs/bpf/isthmus"
	// WireGuardSockDir holds the UAPI sockets of userspace WireGuard devices.
	WireGuardSockDir = "/var/run/wireguard"
	// EnvPrefix is set to the lab prefix in the environment of every command
	// the lab runs, so that CleanupPrefix finds them after a crash.
	EnvPrefix = "ISTHMUS_LAB_PREFIX"
	// EnvKeep, when "1", keeps the lab's temp dir (logs, state) after Close.
	EnvKeep = "ISTHMUS_LAB_KEEP"

	// ownerDir records which process owns which lab prefix (for CleanupStale).
	ownerDir = "/run/isthmus-lab"

	prefixRandLen = 4
	// PrefixLen is the length of every generated prefix.
	PrefixLen = len(Marker) + prefixRandLen
	// MaxIfNameLen is the kernel's limit on interface names (IFNAMSIZ-1).
	MaxIfNameLen = 15
)

var (
	prefixRE = regexp.MustCompile(`^` + Marker + `[0-9a-z]{4}$`)
	nameRE   = regexp.MustCompile(`^[a-z0-9][a-z0-9-]{0,39}$`)
)

// Options configure a Lab. The zero value is fine.
type Options struct {
	// Prefix is the per-run name prefix: Marker plus 4 characters [0-9a-z].
	// Empty means a random free one.
	Prefix string
	// Keep keeps Dir after Close (also when ISTHMUS_LAB_KEEP=1).
	Keep bool
	// Detached lets started processes outlive the process that created the
	// lab (no parent-death signal) and marks the lab as never stale, for
	// `isthmus lab up`. Tear such a lab down with Close or CleanupPrefix.
	Detached bool
	// NoStaleCleanup disables the best-effort CleanupStale that New runs.
	NoStaleCleanup bool
	// CloseOnSignal closes the lab on SIGINT or SIGTERM before the signal
	// takes its default action (labs of tests and programs that run to
	// completion; not for a lab that is meant to outlive its creator).
	CloseOnSignal bool
	// Binaries finds the agent, server and CLI binaries, once, when the
	// lab first starts one of them; nil means FindBinaries (never a build).
	Binaries func() (Binaries, error)
	// Logf receives progress messages; defaults to stderr.
	Logf func(format string, args ...any)
}

// Lab is one run's set of namespaces, links, processes and files.
type Lab struct {
	prefix   string
	dir      string
	keep     bool
	detached bool
	logf     func(format string, args ...any)

	findBinaries func() (Binaries, error)
	binOnce      sync.Once
	bins         Binaries
	binErr       error

	mu        sync.Mutex
	spaces    map[string]*Netns
	procs     []*Proc
	onClose   []func() error
	procSeq   int
	hostSeq   int
	closed    bool
	closeErr  error
	closeOnce sync.Once
}

// New creates a lab: it picks a prefix, records its owner and creates its
// temp dir. The caller closes it (Close); labtest.New does that for tests.
func New(opts Options) (*Lab, error) {
	if os.Geteuid() != 0 {
		return nil, errors.New("lab: must run as root (network namespaces need CAP_NET_ADMIN and CAP_SYS_ADMIN)")
	}
	for _, tool := range []string{"ip", "nsenter"} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("lab: %s not found in PATH (run `make deps`): %w", tool, err)
		}
	}
	l := &Lab{
		keep:         opts.Keep || os.Getenv(EnvKeep) == "1",
		detached:     opts.Detached,
		logf:         opts.Logf,
		findBinaries: opts.Binaries,
		spaces:       map[string]*Netns{},
	}
	if l.logf == nil {
		l.logf = func(format string, args ...any) { fmt.Fprintf(os.Stderr, "lab: "+format+"\n", args...) }
	}
	if l.findBinaries == nil {
		l.findBinaries = FindBinaries
	}
	if !opts.NoStaleCleanup {
		if err := CleanupStale(); err != nil {
			l.logf("cleanup of stale labs: %v", err)
		}
	}
	if err := os.MkdirAll(ownerDir, 0o755); err != nil {
		return nil, fmt.Errorf("lab: %w", err)
	}
	if opts.Prefix != "" {
		if !prefixRE.MatchString(opts.Prefix) {
			return nil, fmt.Errorf("lab: prefix %q must be %q followed by 4 characters [0-9a-z]", opts.Prefix, Marker)
		}
		if prefixInUse(opts.Prefix) {
			return nil, fmt.Errorf("lab: prefix %q is in use (leftovers? try lab.CleanupPrefix)", opts.Prefix)
		}
		if err := writeOwner(opts.Prefix, l.detached); err != nil {
			return nil, err
		}
		l.prefix = opts.Prefix
	} else {
		for range 100 {
			p := Marker + randomBase36(prefixRandLen)
			if prefixInUse(p) {
				continue
			}
			if err := writeOwner(p, l.detached); err != nil {
				if errors.Is(err, os.ErrExist) {
					continue
				}
				return nil, err
			}
			l.prefix = p
			break
		}
		if l.prefix == "" {
			return nil, errors.New("lab: no free prefix found")
		}
	}
	dir, err := os.MkdirTemp("", l.prefix+"-")
	if err != nil {
		_ = os.Remove(ownerPath(l.prefix))
		return nil, fmt.Errorf("lab: %w", err)
	}
	l.dir = dir
	if err := os.MkdirAll(filepath.Join(dir, "logs"), 0o755); err != nil {
		_ = l.Close()
		return nil, fmt.Errorf("lab: %w", err)
	}
	if opts.CloseOnSignal {
		registerLive(l)
	}
	return l, nil
}

// Binaries returns the binaries the lab runs (Options.Binaries, found once).
func (l *Lab) Binaries() (Binaries, error) {
	l.binOnce.Do(func() { l.bins, l.binErr = l.findBinaries() })
	return l.bins, l.binErr
}

// Binary returns the path of one of the binaries the lab runs.
func (l *Lab) Binary(name string) (string, error) {
	b, err := l.Binaries()
	if err != nil {
		return "", err
	}
	return b.Path(name)
}

// Prefix returns the per-run prefix, e.g. "ilab3k9z".
func (l *Lab) Prefix() string { return l.prefix }

// Dir returns the run's temp dir (state dirs, logs, sockets). It is removed
// on Close unless Options.Keep or ISTHMUS_LAB_KEEP=1.
func (l *Lab) Dir() string { return l.dir }

// Name returns "<prefix>-<s>", the form of netns and node names.
func (l *Lab) Name(s string) string { return l.prefix + "-" + s }

// IfName returns "<prefix><s>" for an interface (or WireGuard socket) in the
// host namespace, or an error if it would exceed 15 characters.
func (l *Lab) IfName(s string) (string, error) {
	n := l.prefix + s
	if len(n) > MaxIfNameLen {
		return "", fmt.Errorf("lab: interface name %q longer than %d characters", n, MaxIfNameLen)
	}
	return n, nil
}

// Netns returns the namespace created under the short name, or nil.
func (l *Lab) Netns(name string) *Netns {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.spaces[name]
}

// Procs returns the processes started in this lab so far.
func (l *Lab) Procs() []*Proc {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]*Proc(nil), l.procs...)
}

// Close runs the OnClose hooks, kills every started process with its process
// group, removes what CleanupPrefix removes (namespaces, host links, bpffs pin
// dirs, WireGuard sockets, and the leftovers of Kubernetes nodes), and
// removes Dir (unless kept). It is idempotent, safe after a partial failure,
// and always tries every step; the returned error joins what failed.
func (l *Lab) Close() error {
	l.closeOnce.Do(func() {
		l.mu.Lock()
		l.closed = true
		procs := append([]*Proc(nil), l.procs...)
		hooks := l.onClose
		l.mu.Unlock()
		unregisterLive(l)

		var errs []error
		for i := len(hooks) - 1; i >= 0; i-- {
			if err := hooks[i](); err != nil {
				errs = append(errs, err)
			}
		}
		for _, p := range procs {
			if err := p.Kill(); err != nil {
				errs = append(errs, err)
			}
		}
		if err := cleanupPrefix(l.prefix, false); err != nil {
			errs = append(errs, err)
		}
		if l.dir != "" {
			if l.keep {
				l.logf("kept lab dir %s (%s=1)", l.dir, EnvKeep)
			} else if err := os.RemoveAll(l.dir); err != nil {
				errs = append(errs, err)
			}
		}
		if err := os.Remove(ownerPath(l.prefix)); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
		l.closeErr = errors.Join(errs...)
	})
	return l.closeErr
}

// OnClose registers fn to run at the start of Close, before the lab's
// processes are killed; hooks run last registered first. Packages that
// build on the lab (lab/kube) use it for what the generic cleanup by prefix
// cannot know about. It returns an error when the lab is already closed.
func (l *Lab) OnClose(fn func() error) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := l.checkOpen(); err != nil {
		return err
	}
	l.onClose = append(l.onClose, fn)
	return nil
}

func (l *Lab) checkOpen() error {
	if l.closed {
		return fmt.Errorf("lab %s: closed", l.prefix)
	}
	return nil
}

// Tail returns the last n bytes of s, marked as cut when it is.
func Tail(s string, n int) string { return tail(s, n) }

func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "...\n" + s[len(s)-n:]
}

func randomBase36(n int) string {
	const alphabet = "0123456789abcdefghijklmnopqrstuvwxyz"
	b := make([]byte, n)
	if _, err := io.ReadFull(rand.Reader, b); err != nil {
		panic(err)
	}
	for i := range b {
		b[i] = alphabet[int(b[i])%len(alphabet)]
	}
	return string(b)
}

// prefixInUse reports whether anything on the host already carries prefix.
func prefixInUse(prefix string) bool {
	if _, err := os.Stat(ownerPath(prefix)); err == nil {
		return true
	}
	for _, pattern := range []string{
		filepath.Join(NetnsDir, prefix+"*"),
		filepath.Join(PinRoot, prefix+"*"),
		filepath.Join(os.TempDir(), prefix+"-*"),
	} {
		if m, _ := filepath.Glob(pattern); len(m) > 0 {
			return true
		}
	}
	return false
}

// owner is what /run/isthmus-lab/<prefix>.json records about a lab.
type owner struct {
	Pid       int    `json:"pid"`
	StartTime uint64 `json:"start_time"` // field 22 of /proc/<pid>/stat
	Detached  bool   `json:"detached"`
}

func ownerPath(prefix string) string { return filepath.Join(ownerDir, prefix+".json") }

func writeOwner(prefix string, detached bool) error {
	st, err := procStartTime(os.Getpid())
	if err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	b, _ := json.Marshal(owner{Pid: os.Getpid(), StartTime: st, Detached: detached})
	f, err := os.OpenFile(ownerPath(prefix), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	_, werr := f.Write(b)
	cerr := f.Close()
	if err := errors.Join(werr, cerr); err != nil {
		return fmt.Errorf("lab: %w", err)
	}
	return nil
}

// EnsureBPFFS mounts bpffs at /sys/fs/bpf unless one is mounted there.
func EnsureBPFFS() error {
	const path = "/sys/fs/bpf"
	var st syscall.Statfs_t
	if err := syscall.Statfs(path, &st); err == nil && uint32(st.Type) == 0xcafe4a11 { // BPF_FS_MAGIC
		return nil
	}
	if err := os.MkdirAll(path, 0o755); err != nil {
		return err
	}
	if err := syscall.Mount("bpf", path, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("lab: mount bpffs at %s: %w", path, err)
	}
	return nil
}

// Labs created with CloseOnSignal are closed on SIGINT/SIGTERM before the
// signal is delivered again with its default action.
var live = struct {
	sync.Mutex
	labs map[*Lab]struct{}
	once sync.Once
}{labs: map[*Lab]struct{}{}}

func registerLive(l *Lab) {
	live.Lock()
	live.labs[l] = struct{}{}
	live.Unlock()
	live.once.Do(func() {
		ch := make(chan os.Signal, 1)
		signal.Notify(ch, syscall.SIGINT, syscall.SIGTERM)
		go func() {
			sig := <-ch
			live.Lock()
			labs := make([]*Lab, 0, len(live.labs))
			for l := range live.labs {
				labs = append(labs, l)
			}
			live.Unlock()
			sort.Slice(labs, func(i, j int) bool { return labs[i].prefix < labs[j].prefix })
			for _, l := range labs {
				fmt.Fprintf(os.Stderr, "lab: %v: closing %s\n", sig, l.prefix)
				if err := l.Close(); err != nil {
					fmt.Fprintf(os.Stderr, "lab: close %s: %v\n", l.prefix, err)
				}
			}
			signal.Reset(sig)
			_ = syscall.Kill(os.Getpid(), sig.(syscall.Signal))
		}()
	})
}

func unregisterLive(l *Lab) {
	live.Lock()
	delete(live.labs, l)
	live.Unlock()
}
