package lab

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// The project's binaries a lab runs. The lab never builds them: `make
// build` puts all three into bin/; tests build them with package labtest.
const (
	AgentBinary  = "isthmus-agent"
	CLIBinary    = "isthmus"
	ServerBinary = "isthmus-clustermesh"
	// CNIBinary is the CNI plugin: optional (a lab runs it only in tests
	// of Kubernetes mode), found next to the others when it is there.
	CNIBinary = "isthmus-cni"
	// EnvBinDir names a directory that holds all three; it takes precedence
	// over the lookup of FindBinaries.
	EnvBinDir = "ISTHMUS_BIN_DIR"
)

// binaryNames lists the binaries in the order they are reported.
var binaryNames = []string{ServerBinary, AgentBinary, CLIBinary}

// Binaries are the paths of the three binaries and where they were found.
type Binaries struct {
	Agent  string `json:"agent"`
	Server string `json:"server"`
	CLI    string `json:"cli"`
	// CNI is the CNI plugin, "" when it was not found (it is optional).
	CNI string `json:"cni,omitempty"`
	// From says where they were found, for the user: "$ISTHMUS_BIN_DIR",
	// "next to /path/to/isthmus", "$PATH", or what the caller set.
	From string `json:"from,omitempty"`
}

// Path returns the path of one of the binaries by name (AgentBinary,
// ServerBinary, CLIBinary).
func (b Binaries) Path(name string) (string, error) {
	var p string
	switch name {
	case AgentBinary:
		p = b.Agent
	case ServerBinary:
		p = b.Server
	case CLIBinary:
		p = b.CLI
	case CNIBinary:
		p = b.CNI
		if p == "" {
			return "", fmt.Errorf("lab: no %s (%s): run 'make build', which builds it into bin/", name, b.From)
		}
	default:
		return "", fmt.Errorf("lab: no binary %q (want %s or %s)", name, strings.Join(binaryNames, ", "), CNIBinary)
	}
	if p == "" {
		return "", fmt.Errorf("lab: no path for %s (%s)", name, b.From)
	}
	return p, nil
}

// Paths lists the three paths (server, agent, CLI).
func (b Binaries) Paths() []string { return []string{b.Server, b.Agent, b.CLI} }

// BinariesIn returns the binaries in dir; each must be there.
func BinariesIn(dir string) (Binaries, error) {
	var missing []string
	for _, n := range binaryNames {
		if !isExecutable(filepath.Join(dir, n)) {
			missing = append(missing, n)
		}
	}
	if len(missing) > 0 {
		return Binaries{}, fmt.Errorf("lab: %s has no %s: %s", dir, strings.Join(missing, ", "), buildHint)
	}
	b := Binaries{
		Agent:  filepath.Join(dir, AgentBinary),
		Server: filepath.Join(dir, ServerBinary),
		CLI:    filepath.Join(dir, CLIBinary),
		From:   dir,
	}
	if p := filepath.Join(dir, CNIBinary); isExecutable(p) {
		b.CNI = p
	}
	return b, nil
}

const buildHint = "run 'make build' (it builds isthmus, isthmus-agent and isthmus-clustermesh into bin/) and use bin/isthmus, put the three binaries in $PATH, or set " + EnvBinDir

// FindBinaries finds the three binaries without building anything: in
// $ISTHMUS_BIN_DIR when it is set; else next to the running executable
// (bin/isthmus finds bin/isthmus-agent and bin/isthmus-clustermesh) when
// one of them is there, in which case all must be; else in $PATH (the CLI:
// the running executable when it is isthmus). A missing binary is an error
// that says how to build it.
func FindBinaries() (Binaries, error) {
	if dir := os.Getenv(EnvBinDir); dir != "" {
		b, err := BinariesIn(dir)
		if err != nil {
			return Binaries{}, fmt.Errorf("%s=%s: %w", EnvBinDir, dir, err)
		}
		b.From = "$" + EnvBinDir
		return b, nil
	}
	exe, err := os.Executable()
	if err == nil {
		if r, err := filepath.EvalSymlinks(exe); err == nil {
			exe = r
		}
		dir := filepath.Dir(exe)
		// The running executable counts only when it is the CLI; a test
		// binary or a `go run` build has no siblings.
		if isExecutable(filepath.Join(dir, AgentBinary)) || isExecutable(filepath.Join(dir, ServerBinary)) {
			b, err := BinariesIn(dir)
			if err != nil {
				return Binaries{}, fmt.Errorf("%w (the binaries next to %s are incomplete)", err, exe)
			}
			b.From = "next to " + exe
			return b, nil
		}
	}
	var b Binaries
	var missing []string
	for _, n := range binaryNames {
		if n == CLIBinary && exe != "" && filepath.Base(exe) == CLIBinary {
			b.CLI = exe // the running CLI itself
			continue
		}
		p, err := exec.LookPath(n)
		if err != nil {
			missing = append(missing, n)
			continue
		}
		if p, err = filepath.Abs(p); err != nil {
			return Binaries{}, err
		}
		switch n {
		case AgentBinary:
			b.Agent = p
		case ServerBinary:
			b.Server = p
		case CLIBinary:
			b.CLI = p
		}
	}
	if p, err := exec.LookPath(CNIBinary); err == nil {
		if p, err = filepath.Abs(p); err == nil {
			b.CNI = p
		}
	}
	if len(missing) > 0 {
		where := "not in $PATH"
		if exe != "" {
			where = "not next to " + exe + " and not in $PATH"
		}
		return Binaries{}, fmt.Errorf("lab: %s %s: %s", strings.Join(missing, ", "), where, buildHint)
	}
	b.From = "$PATH"
	return b, nil
}

func isExecutable(p string) bool {
	st, err := os.Stat(p)
	return err == nil && !st.IsDir() && st.Mode()&0o111 != 0
}
