package northsouth

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/isthmus-mesh/isthmus/agent/api"
	"github.com/isthmus-mesh/isthmus/agent/node"
	"github.com/isthmus-mesh/isthmus/agent/reconcile"
)

// Datapath is what the reconciler uses of *bpf.Datapath.
type Datapath interface {
	AttachExternal(ifname string, ifindex int) error
	DetachExternal(ifname string) error
	ExternalAttached() ([]string, error)
}

// Config is the agent's north-south setting.
type Config struct {
	// Node names the nftables table.
	Node string
	// Devices are the external devices by name (--external-devices);
	// empty: the node's external devices as found (node.ExternalLinks).
	Devices []string
	Log     *slog.Logger
}

// Input is what one run converges.
type Input struct {
	// NodeIPs are the underlay addresses (cluster mode): their devices are
	// external devices.
	NodeIPs []netip.Addr
	// NodeAddrs are the node's addresses: when they change, its external
	// devices may have.
	NodeAddrs []netip.Addr
	// SNAT: some external frontend is under externalTrafficPolicy Cluster,
	// so the masquerade must be in place.
	SNAT bool
}

// Reconciler attaches the external programs and keeps the SNAT table.
// Sync runs in the reconcile loop only; Status is safe anywhere.
type Reconciler struct {
	cfg Config
	dp  Datapath

	key  string // the inputs the devices were last converged for
	snat *bool  // the SNAT state last converged (nil: never)
	// unwanted is since when no frontend under Cluster wanted the SNAT
	// table (zero while one does); see snatHold.
	unwanted time.Time
	fullAt   time.Time
	failed   bool

	mu     sync.Mutex
	status api.NorthSouthStatus
}

// New returns the reconciler of dp's external attachments.
func New(cfg Config, dp Datapath) *Reconciler {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	return &Reconciler{cfg: cfg, dp: dp, status: api.NorthSouthStatus{Table: TableName(cfg.Node), Configured: slices.Clone(cfg.Devices)}}
}

// snatHold is how long no frontend under Cluster must want the SNAT table
// before a full pass removes it. Removing it at once would cut the
// established flows from outside whenever the wish flickers: an agent
// that starts (SIGKILLed and restarted) runs its first passes before
// every frontend is back, and without a NAT chain in the namespace the
// kernel stops applying the NAT of existing connections, so the replies
// of remote backends no longer find their way back (the flow is reset).
// A table kept longer costs nothing: it masquerades only packets that
// from_external marked for a frontend under Cluster.
const snatHold = 30 * time.Second

// Sync attaches the programs to the external devices (and detaches them
// from devices that are no longer external), and creates or removes the
// SNAT table. It does something only when its inputs changed, after a
// failure, and every reconcile.ResyncInterval. The error is for what
// could not be done (also in the status); the rest went through.
func (r *Reconciler) Sync(in Input) error {
	full := time.Since(r.fullAt) >= reconcile.ResyncInterval
	key := fmt.Sprint(in.NodeIPs, in.NodeAddrs)
	devices := full || r.failed || key != r.key
	snat := full || r.failed || r.snat == nil || *r.snat != in.SNAT
	if !devices && !snat {
		return nil
	}
	if full {
		r.fullAt = time.Now()
	}
	r.mu.Lock()
	st := r.status
	r.mu.Unlock()
	st.Devices = slices.Clone(st.Devices)
	var errs []error
	if devices {
		devs, err := r.syncDevices(in)
		st.Devices = devs
		if err != nil {
			errs = append(errs, err)
		}
		r.key = key
	}
	if snat {
		st.SNATWanted = in.SNAT
		var err error
		if in.SNAT {
			var changed bool
			changed, err = EnsureTable(r.cfg.Node)
			if changed {
				r.cfg.Log.Info("north-south: SNAT table written", "table", TableName(r.cfg.Node))
			}
			st.SNATPresent = err == nil
			r.unwanted = time.Time{}
		} else {
			if r.unwanted.IsZero() {
				r.unwanted = time.Now()
			}
			if time.Since(r.unwanted) >= snatHold {
				err = RemoveTable(r.cfg.Node)
				st.SNATPresent = false
			} else {
				// Kept for now (a later full pass removes it): see
				// snatHold.
				var present bool
				present, err = TablePresent(r.cfg.Node)
				st.SNATPresent = present
			}
		}
		st.SNATError = ""
		if err != nil {
			st.SNATError = err.Error()
			errs = append(errs, err)
		}
		v := in.SNAT
		r.snat = &v
	}
	err := errors.Join(errs...)
	r.failed = err != nil
	st.Error = ""
	if err != nil {
		st.Error = err.Error()
	}
	r.mu.Lock()
	r.status = st
	r.mu.Unlock()
	return err
}

// syncDevices attaches to every external device and detaches from the
// devices that were and are no longer.
func (r *Reconciler) syncDevices(in Input) ([]api.NorthSouthDevice, error) {
	var errs []error
	var devs []api.NorthSouthDevice
	if len(r.cfg.Devices) > 0 {
		for _, name := range r.cfg.Devices {
			d := api.NorthSouthDevice{Name: name, Roles: []string{"configured"}}
			if l, err := netlink.LinkByName(name); err != nil {
				d.Reason = fmt.Sprintf("not found: %v", err)
				errs = append(errs, fmt.Errorf("external device %s: %w", name, err))
			} else {
				d.Index = l.Attrs().Index
			}
			devs = append(devs, d)
		}
	} else {
		links, err := node.ExternalLinks(in.NodeIPs)
		if err != nil {
			errs = append(errs, err)
		}
		for _, el := range links {
			l, err := netlink.LinkByIndex(el.Index)
			if err != nil {
				errs = append(errs, fmt.Errorf("external device %d: %w", el.Index, err))
				continue
			}
			if l.Attrs().Flags&net.FlagLoopback != 0 {
				continue
			}
			devs = append(devs, api.NorthSouthDevice{Name: l.Attrs().Name, Index: el.Index, Roles: el.Roles})
		}
	}
	want := map[string]bool{}
	for i := range devs {
		d := &devs[i]
		if d.Index == 0 {
			continue
		}
		want[d.Name] = true
		if err := r.dp.AttachExternal(d.Name, d.Index); err != nil {
			d.Reason = err.Error()
			errs = append(errs, err)
			continue
		}
		d.Attached = true
	}
	pinned, err := r.dp.ExternalAttached()
	if err != nil {
		errs = append(errs, err)
	}
	for _, name := range pinned {
		if want[name] {
			continue
		}
		if err := r.dp.DetachExternal(name); err != nil {
			errs = append(errs, fmt.Errorf("detach the external programs from %s: %w", name, err))
			continue
		}
		r.cfg.Log.Info("north-south: programs detached from a device that is no longer external", "device", name)
	}
	return devs, errors.Join(errs...)
}

// Status returns the status of the last run (a copy); nil on a nil
// Reconciler.
func (r *Reconciler) Status() *api.NorthSouthStatus {
	if r == nil {
		return nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	st := r.status
	st.Devices = slices.Clone(st.Devices)
	return &st
}
