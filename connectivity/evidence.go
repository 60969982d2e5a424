package connectivity

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
)

// Evidence is what a verdict rests on: what was sent, what answered, and
// what a capture saw.
type Evidence struct {
	Probes  []Probe        `json:"probes,omitempty"`
	Capture *CaptureResult `json:"capture,omitempty"`
}

// Probe is the HTTP requests one pod sent to one address, and what came of
// them.
type Probe struct {
	From string         `json:"from"` // the pod that sent
	To   netip.AddrPort `json:"to"`
	Sent int            `json:"sent"`
	// Answers counts the echo replies by who answered ("pod=… node=…
	// cluster=…").
	Answers map[string]int `json:"answers,omitempty"`
	// Failures counts the requests without an answer by Outcome ("timed
	// out", "answer timed out", "refused", "reset", "unreachable",
	// "error").
	Failures  map[string]int `json:"failures,omitempty"`
	LastError string         `json:"lastError,omitempty"`
	// Purpose says what the probe is for where a check sends for more than
	// one reason (the deny check: its preconditions and the denial).
	Purpose string `json:"purpose,omitempty"`
}

// Purposes of the deny check's probes.
const (
	PurposeAdmitted   = "precondition (the target answers an admitted pod)"
	PurposeOwnNetwork = "precondition (the denied pod's own network)"
	PurposeDeny       = "must time out (denied)"
)

func newProbe(from string, to netip.AddrPort) *Probe { return &Probe{From: from, To: to} }

func (p *Probe) record(reply Reply, err error) {
	p.Sent++
	if err == nil {
		if p.Answers == nil {
			p.Answers = map[string]int{}
		}
		p.Answers[reply.String()]++
		return
	}
	if p.Failures == nil {
		p.Failures = map[string]int{}
	}
	p.Failures[Outcome(err)]++
	p.LastError = err.Error()
}

// Outcomes of a request without an answer (Outcome).
const (
	// OutcomeTimedOut: the connection attempt got no answer at all (the
	// SYN was dropped somewhere). The only outcome that is a policy's
	// denial: the datapath drops what a policy does not admit.
	OutcomeTimedOut = "timed out"
	// OutcomeAnswerTimedOut: connected, but no answer in time.
	OutcomeAnswerTimedOut = "answer timed out"
	// OutcomeRefused: a RST to the SYN (something is there, nothing
	// listens).
	OutcomeRefused = "refused"
	// OutcomeReset: the connection was reset after it was established.
	OutcomeReset = "reset"
	// OutcomeUnreachable: no route, or an ICMP unreachable.
	OutcomeUnreachable = "unreachable"
	// OutcomeError: anything else (the namespace could not be entered, an
	// HTTP error, not an echo reply, ...).
	OutcomeError = "error"
)

// Outcome names why a request of FetchEcho got no answer: one of the
// Outcome* constants. A timeout counts as OutcomeTimedOut only when it
// is the connection attempt's (a *ConnectError); any later one is
// OutcomeAnswerTimedOut.
func Outcome(err error) string {
	var ne net.Error
	var ce *ConnectError
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return OutcomeRefused
	case errors.Is(err, syscall.ECONNRESET):
		return OutcomeReset
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
		return OutcomeUnreachable
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		if errors.As(err, &ce) {
			return OutcomeTimedOut
		}
		return OutcomeAnswerTimedOut
	}
	return OutcomeError
}

// String is one line: "c1-n1-echo1 -> 10.1.1.3:8080: 3 sent; answered by
// pod=… node=… cluster=… (1); 2 timed out (last: …)".
func (p Probe) String() string {
	var parts []string
	for _, a := range slices.Sorted(maps.Keys(p.Answers)) {
		parts = append(parts, fmt.Sprintf("answered by %s (%d)", a, p.Answers[a]))
	}
	if len(p.Answers) == 0 {
		parts = append(parts, "no answer")
	}
	for _, f := range slices.Sorted(maps.Keys(p.Failures)) {
		parts = append(parts, fmt.Sprintf("%d %s", p.Failures[f], f))
	}
	s := fmt.Sprintf("%s -> %s: %d sent; %s", p.From, p.To, p.Sent, strings.Join(parts, "; "))
	if p.LastError != "" {
		s += " (last error: " + p.LastError + ")"
	}
	return s
}

// String is one line: "captured on c1-n1/eth0: 211 packets, 211 WireGuard
// (udp/51871), 0 with one of 10 pod addresses or VIPs in the clear".
func (c CaptureResult) String() string {
	var ports []string
	for _, p := range c.Ports {
		ports = append(ports, fmt.Sprint(p))
	}
	where := c.Interface
	if c.Node != "" {
		where = c.Node + "/" + c.Interface
	}
	s := fmt.Sprintf("captured on %s: %d packets, %d WireGuard (udp/%s), %d with one of %d pod addresses or VIPs in the clear",
		where, c.Total, c.WireGuard, strings.Join(ports, ","), c.Plaintext, c.Watched)
	if c.FirstLeak != "" {
		s += " (first: " + c.FirstLeak + ")"
	}
	return s
}

// Lines lists the evidence, one line per probe and capture.
func (e Evidence) Lines() []string {
	var out []string
	for _, p := range e.Probes {
		l := "sent " + p.String()
		if p.Purpose != "" {
			l = p.Purpose + ": " + l
		}
		out = append(out, l)
	}
	if e.Capture != nil {
		out = append(out, e.Capture.String())
	}
	return out
}

// WriteTable writes the results as a table (CHECK FROM TO RESULT DETAIL)
// and a summary line; verbose adds every result's evidence after the
// table.
func (rep Report) WriteTable(w io.Writer, verbose bool) error {
	t := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	fmt.Fprintln(t, "CHECK\tFROM\tTO\tRESULT\tDETAIL")
	for _, r := range rep.Results {
		fmt.Fprintf(t, "%s\t%s\t%s\t%s\t%s\n", r.Check, orDash(r.From), orDash(r.To), r.Result, r.Detail)
	}
	if err := t.Flush(); err != nil {
		return err
	}
	if verbose {
		fmt.Fprintln(w, "\nEvidence:")
		for i, r := range rep.Results {
			fmt.Fprintf(w, "  [%d] %s %s: %s\n", i+1, r.Check, fromTo(r), r.Result)
			lines := r.Evidence.Lines()
			if len(lines) == 0 {
				lines = []string{"nothing sent: " + r.Detail}
			}
			for _, l := range lines {
				fmt.Fprintf(w, "      %s\n", l)
			}
		}
	}
	_, err := fmt.Fprintf(w, "\n%s: %d passed, %d failed, %d skipped\n", rep.Target, rep.Passed, rep.Failed, rep.Skipped)
	return err
}

func fromTo(r Result) string {
	if r.From == "" && r.To == "" {
		return "-"
	}
	return orDash(r.From) + " -> " + orDash(r.To)
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
