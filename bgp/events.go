package bgp

import (
	"context"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/osrg/gobgp/v3/pkg/log"
	"github.com/osrg/gobgp/v3/pkg/packet/bgp"
)

// events is GoBGP's logger: it forwards to slog and keeps, per peer, the
// latest reason a session failed. GoBGP reports NOTIFICATIONs, connect
// errors and expired hold timers only through its log, so this is where
// the status learns them.
type events struct {
	log *slog.Logger

	mu     sync.Mutex
	wanted map[netip.Addr]Peer
	errs   map[netip.Addr]peerError
	// syncFinished, when set, is called on GoBGP's "sync finished" (a
	// restarted speaker has all its established peers' End-of-RIBs).
	syncFinished func()
}

type peerError struct {
	msg string
	at  time.Time
}

func newEvents(l *slog.Logger) *events {
	return &events{log: l, wanted: map[netip.Addr]Peer{}, errs: map[netip.Addr]peerError{}}
}

// setWanted records the peers the speaker should have; a peer that cannot
// be configured gets its reason as its error.
func (e *events) setWanted(w map[netip.Addr]Peer) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.wanted = maps.Clone(w)
	for a := range e.errs {
		if _, ok := w[a]; !ok {
			delete(e.errs, a)
		}
	}
	for a, p := range w {
		if p.PasswordError != "" && e.errs[a].msg != p.PasswordError {
			e.errs[a] = peerError{msg: p.PasswordError, at: time.Now()}
		}
	}
}

func (e *events) wantedPeers() []Peer {
	e.mu.Lock()
	defer e.mu.Unlock()
	out := slices.Collect(maps.Values(e.wanted))
	slices.SortFunc(out, func(a, b Peer) int { return a.Address.Compare(b.Address) })
	return out
}

func (e *events) lastError(a netip.Addr) (string, time.Time) {
	e.mu.Lock()
	defer e.mu.Unlock()
	pe := e.errs[a]
	return pe.msg, pe.at
}

func (e *events) forgetAll() {
	e.mu.Lock()
	defer e.mu.Unlock()
	clear(e.errs)
}

// record derives a peer error from one GoBGP log message.
func (e *events) record(msg string, f log.Fields) {
	if msg == "sync finished" && e.syncFinished != nil {
		e.syncFinished()
	}
	key, _ := f["Key"].(string)
	addr, err := netip.ParseAddr(key)
	if err != nil {
		return
	}
	var reason string
	switch msg {
	case "received notification", "sent notification":
		dir := "received"
		if msg == "sent notification" {
			dir = "sent"
		}
		code, ok1 := f["Code"].(uint8)
		sub, ok2 := f["Subcode"].(uint8)
		if me, ok := f["Data"].(*bgp.MessageError); ok && !ok1 {
			// GoBGP refused the peer's message itself (a wrong peer AS
			// in its OPEN, a bad hold time, ...).
			code, sub, ok1, ok2 = me.TypeCode, me.SubTypeCode, true, true
			reason = fmt.Sprintf("notification %s: %s: %s", dir, bgp.NewNotificationErrorCode(code, sub), me.Message)
			break
		}
		if !ok1 || !ok2 {
			reason = fmt.Sprintf("notification %s: %v", dir, f["Data"])
			break
		}
		reason = fmt.Sprintf("notification %s: %s", dir, bgp.NewNotificationErrorCode(code, sub))
		if c, _ := f["Communicated-Reason"].(string); c != "" {
			reason += ": " + c
		}
	case "state changed":
		// A NOTIFICATION the peer sends in answer to our OPEN arrives in
		// OpenConfirm, where GoBGP drops the session as "invalid-msg"
		// without logging the message: its code is lost.
		if fmt.Sprint(f["old"]) != "BGP_FSM_OPENCONFIRM" || fmt.Sprint(f["reason"]) != "invalid-msg" {
			return
		}
		reason = "notification received in answer to our OPEN: the peer refused the session (check the AS it expects of us, our router ID and the MD5 password)"
	case "failed to connect":
		reason = fmt.Sprintf("connect: %v", f["Error"])
	case "hold timer expired":
		reason = "hold timer expired"
	default:
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	p, ok := e.wanted[addr]
	if !ok {
		return
	}
	if msg == "failed to connect" && p.Password != "" {
		// A peer with another (or no) password drops our SYNs silently:
		// a wrong password looks like an unreachable peer.
		reason += " (TCP MD5 is on: a peer with another password drops the connection silently)"
	}
	if e.errs[addr].msg != reason {
		e.log.Info("peer error", "peer", addr, "reason", reason)
	}
	e.errs[addr] = peerError{msg: reason, at: time.Now()}
}

func (e *events) forward(level slog.Level, msg string, f log.Fields) {
	if !e.log.Enabled(context.Background(), level) {
		return
	}
	args := make([]any, 0, 2*len(f)+2)
	args = append(args, "gobgp", true)
	for _, k := range slices.Sorted(maps.Keys(f)) {
		args = append(args, k, f[k])
	}
	e.log.Log(context.Background(), level, msg, args...)
}

// GoBGP's log levels map one below slog's: its warnings (a connect
// failure, a NOTIFICATION) are routine for a speaker whose peer is down,
// and the status reports them.

func (e *events) Panic(msg string, f log.Fields) { e.forward(slog.LevelError, msg, f); panic(msg) }
func (e *events) Fatal(msg string, f log.Fields) { e.forward(slog.LevelError, msg, f) }
func (e *events) Error(msg string, f log.Fields) { e.record(msg, f); e.forward(slog.LevelWarn, msg, f) }
func (e *events) Warn(msg string, f log.Fields)  { e.record(msg, f); e.forward(slog.LevelInfo, msg, f) }
func (e *events) Info(msg string, f log.Fields)  { e.record(msg, f); e.forward(slog.LevelInfo, msg, f) }
func (e *events) Debug(msg string, f log.Fields) {
	e.record(msg, f)
	e.forward(slog.LevelDebug, msg, f)
}

// SetLevel is ignored: record needs GoBGP's debug messages (connect
// errors are logged at debug level only), slog filters what is shown.
func (e *events) SetLevel(log.LogLevel) {}

// GetLevel is debug, so GoBGP emits the connect errors.
func (e *events) GetLevel() log.LogLevel { return log.DebugLevel }
