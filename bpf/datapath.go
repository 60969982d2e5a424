package bpf

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// Datapath is the loaded datapath of one node: its programs and its pinned
// maps. It is safe for concurrent use.
type Datapath struct {
	pinDir string
	objs   datapathObjects

	mu       sync.Mutex
	svcIDs   map[Frontend]uint32 // stable backend-map ID per frontend
	lbIDs    map[Frontend]uint32 // the same for isth_lb's frontends (one ID space)
	usedIDs  map[uint32]bool
	nextID   uint32
	attachFn string // "tcx" or "tc" (clsact): how the pod programs were last attached
	// endpointAttach is how AttachEndpoint attaches (SetEndpointAttach).
	endpointAttach string
	noBatch        atomic.Bool // the kernel has no batch updates of the ipcache
}

// EnsureBPFFS mounts a bpf filesystem at root unless one is there already.
func EnsureBPFFS(root string) error {
	var st unix.Statfs_t
	if err := unix.Statfs(root, &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := os.MkdirAll(root, 0o755); err != nil {
		return fmt.Errorf("create bpffs mount point %s: %w", root, err)
	}
	if err := unix.Mount("bpf", root, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w", root, err)
	}
	return nil
}

// Open loads the datapath programs with their maps pinned in pinDir. Maps
// already pinned there (from an earlier run of the agent) are reused with
// their contents, so a restart loses no state.
func Open(pinDir string) (*Datapath, error) {
	if err := EnsureBPFFS(filepath.Dir(filepath.Dir(pinDir))); err != nil {
		// pinDir is <bpffs>/isthmus/<node>; a pinDir elsewhere must already be on bpffs.
		var st unix.Statfs_t
		if serr := unix.Statfs(filepath.Dir(pinDir), &st); serr != nil || st.Type != unix.BPF_FS_MAGIC {
			return nil, err
		}
	}
	if err := os.MkdirAll(filepath.Join(pinDir, "links"), 0o700); err != nil {
		return nil, fmt.Errorf("create pin directory %s: %w", pinDir, err)
	}
	spec, err := loadDatapath()
	if err != nil {
		return nil, fmt.Errorf("load datapath spec: %w", err)
	}
	d := &Datapath{pinDir: pinDir, svcIDs: map[Frontend]uint32{}, lbIDs: map[Frontend]uint32{}, usedIDs: map[uint32]bool{}, nextID: 1}
	opts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: pinDir}}
	if err := spec.LoadAndAssign(&d.objs, opts); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("load datapath programs: %+v", verr)
		}
		if errors.Is(err, ebpf.ErrMapIncompatible) {
			return nil, fmt.Errorf("maps pinned in %s do not match this datapath version (remove them with `isthmus-agent --reset-datapath` or delete the directory): %w", pinDir, err)
		}
		return nil, fmt.Errorf("load datapath into the kernel: %w", err)
	}
	if err := d.fillCalls(); err != nil {
		d.objs.Close()
		return nil, err
	}
	if err := d.loadServiceIDs(); err != nil {
		d.objs.Close()
		return nil, err
	}
	if err := d.loadExternalIDs(); err != nil {
		d.objs.Close()
		return nil, err
	}
	return d, nil
}

// Slots of isth_calls, the programs from_pod and to_pod tail-call into
// (c/datapath.c, CALL_*).
const (
	callFromPodICMPErr uint32 = 0
	callToPodICMPErr   uint32 = 1
)

// fillCalls points the tail-call slots at this load's programs. The map is
// pinned, so programs attached by an earlier run reach the new ones too
// (their packet layout is the same: both parse the frame from scratch), and
// the slots stay filled while no agent runs.
func (d *Datapath) fillCalls() error {
	for _, c := range []struct {
		slot uint32
		prog *ebpf.Program
	}{{callFromPodICMPErr, d.objs.FromPodIcmpErr}, {callToPodICMPErr, d.objs.ToPodIcmpErr}} {
		if err := d.objs.IsthCalls.Put(c.slot, c.prog); err != nil {
			return fmt.Errorf("fill tail-call slot %d: %w", c.slot, err)
		}
	}
	return nil
}

// PinDir is where the maps and links of this datapath are pinned.
func (d *Datapath) PinDir() string { return d.pinDir }

// FromPod and ToPod expose the programs, for tests and benchmarks.
func (d *Datapath) FromPod() *ebpf.Program { return d.objs.FromPod }
func (d *Datapath) ToPod() *ebpf.Program   { return d.objs.ToPod }

// Close releases this process's handles. Pinned maps and links stay, so the
// datapath keeps forwarding without the agent.
func (d *Datapath) Close() error {
	return d.objs.Close()
}

// RemovePins deletes everything pinned under pinDir: links are detached and
// maps freed once no program uses them. Used by cleanup, never on restart.
func RemovePins(pinDir string) error {
	if _, err := os.Stat(pinDir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	return os.RemoveAll(pinDir)
}
