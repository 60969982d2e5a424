// Package cniinstall puts the CNI plugin and its network configuration
// into a node's CNI directories (Kubernetes mode), so that the container
// runtime plumbs pods through this node's agent.
//
// Both files are written atomically (a temp file, then a rename): a runtime
// never runs a half-copied plugin or reads a half-written conflist, and a
// plugin binary that is running is replaced, not overwritten.
package cniinstall

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/isthmus-mesh/isthmus/internal/atomicfile"
)

const (
	// PluginType is the plugin's binary name, and its "type" in the conflist.
	PluginType = "isthmus-cni"
	// ConfListName is the conflist's file name: runtimes take the first
	// configuration in lexical order, so it sorts early.
	ConfListName = "05-isthmus.conflist"
	// NetworkName is the network's name in the conflist.
	NetworkName = "isthmus"
	// DefaultCNIVersion is the conflist's cniVersion. The plugin speaks
	// 0.4.0, 1.0.0 and 1.1.0, but containerd 1.6 (Debian 12's) links
	// libcni 1.1, which knows results up to 1.0.0 only and fails every
	// ADD of a 1.1.0 network; 1.1.0 (STATUS, GC) needs containerd 2.
	DefaultCNIVersion = "1.0.0"
)

// Config says what to install where.
type Config struct {
	// BinDir gets the plugin binary (e.g. /opt/cni/bin); "" leaves it out.
	BinDir string
	// ConfDir gets the conflist (e.g. /etc/cni/net.d); "" leaves it out.
	ConfDir string
	// PluginPath is the isthmus-cni binary to copy into BinDir.
	PluginPath string
	// Socket is the agent's API socket, which the plugin talks to.
	Socket string
	// CNIVersion of the conflist; DefaultCNIVersion when empty.
	CNIVersion string
	// MTU, when set, is written into the plugin's configuration (the
	// agent decides the pods' MTU; this is informational for tooling).
	MTU int
}

// Enabled reports whether there is anything to install.
func (c Config) Enabled() bool { return c.BinDir != "" || c.ConfDir != "" }

// PluginConf is the plugin's entry of the conflist.
type PluginConf struct {
	Type        string `json:"type"`
	AgentSocket string `json:"agentSocket"`
	MTU         int    `json:"mtu,omitempty"`
}

// ConfList is the network configuration list the runtime reads.
type ConfList struct {
	CNIVersion string       `json:"cniVersion"`
	Name       string       `json:"name"`
	Plugins    []PluginConf `json:"plugins"`
}

// ConfListJSON returns the conflist for c.
func (c Config) ConfListJSON() ([]byte, error) {
	if c.Socket == "" {
		return nil, errors.New("cni install: no agent socket to point the plugin at")
	}
	v := c.CNIVersion
	if v == "" {
		v = DefaultCNIVersion
	}
	if v != "0.4.0" && v != "1.0.0" && v != "1.1.0" {
		return nil, fmt.Errorf("cni install: cniVersion %q: the plugin speaks 0.4.0, 1.0.0 and 1.1.0", v)
	}
	data, err := json.MarshalIndent(ConfList{CNIVersion: v, Name: NetworkName,
		Plugins: []PluginConf{{Type: PluginType, AgentSocket: c.Socket, MTU: c.MTU}}}, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(data, '\n'), nil
}

// Install copies the plugin into BinDir (mode 0755) and writes the
// conflist into ConfDir (mode 0644), each only when its directory is set.
// It returns the paths it wrote.
func Install(c Config) ([]string, error) {
	var wrote []string
	if c.BinDir != "" {
		if c.PluginPath == "" {
			return nil, errors.New("cni install: no plugin binary to copy (--cni-plugin-path)")
		}
		data, err := os.ReadFile(c.PluginPath)
		if err != nil {
			return nil, fmt.Errorf("cni install: read the plugin binary: %w", err)
		}
		dst := filepath.Join(c.BinDir, PluginType)
		if err := writeFile(dst, data, 0o755); err != nil {
			return nil, err
		}
		wrote = append(wrote, dst)
	}
	if c.ConfDir != "" {
		data, err := c.ConfListJSON()
		if err != nil {
			return nil, err
		}
		dst := filepath.Join(c.ConfDir, ConfListName)
		if err := writeFile(dst, data, 0o644); err != nil {
			return nil, err
		}
		wrote = append(wrote, dst)
	}
	return wrote, nil
}

func writeFile(path string, data []byte, perm os.FileMode) error {
	// CNI directories are read by the runtime, not only by root's tools.
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("cni install: %w", err)
	}
	if err := atomicfile.Write(path, data, perm); err != nil {
		return fmt.Errorf("cni install: %w", err)
	}
	return nil
}
