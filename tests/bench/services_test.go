package main

import (
	"testing"
	"time"
)

// addPhases reads the phases of the last adds from the agent's log lines.
func TestAddPhases(t *testing.T) {
	log := `time=x level=INFO msg="endpoint added" name=a took=9ms phases="labels=0s addresses=1ms veth=2ms attach=3ms datapath=700µs"
time=x level=INFO msg="datapath reconciled" ipcacheChanges=1
time=x level=INFO msg="endpoint added" name=b took=9ms phases="labels=0s addresses=1.5ms veth(sockets=100µs create=300µs pod=2ms host=20ms)=22.4ms store=1.6ms datapath=1.2ms"
`
	got, err := addPhases(log, 1)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 1 || got[0]["veth"] != 22400*time.Microsecond || got[0]["veth.host"] != 20*time.Millisecond ||
		got[0]["datapath"] != 1200*time.Microsecond || got[0]["store"] != 1600*time.Microsecond {
		t.Errorf("phases %v, want b's", got)
	}
	if _, err := addPhases(log, 3); err == nil {
		t.Error("3 adds found in a log of 2")
	}
	for _, bad := range []string{"veth(create=1ms=2ms", "veth=", "=1ms", "veth(create=x)=1ms"} {
		if err := parsePhases(bad, "", map[string]time.Duration{}); err == nil {
			t.Errorf("phases %q parsed", bad)
		}
	}
}

// The probe's stalled share counts the time of the long waits, not their
// number.
func TestProbeStalled(t *testing.T) {
	p := &rtnlProbe{lat: []time.Duration{time.Millisecond, 20 * time.Millisecond, 30 * time.Millisecond}, span: 100 * time.Millisecond}
	if got := p.stalled(10 * time.Millisecond); got != 0.5 {
		t.Errorf("stalled %v, want 0.5", got)
	}
	if got := (&rtnlProbe{}).stalled(time.Millisecond); got != 0 {
		t.Errorf("stalled of an empty probe %v, want 0", got)
	}
}
