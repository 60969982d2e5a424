package e2e

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

// service is a Service document named name with the given spec lines
// (indented under spec:).
func service(name, spec string) string {
	return "apiVersion: isthmus.io/v1alpha1\nkind: Service\nmetadata:\n  name: " + name + "\nspec:\n" + spec
}

// Bad input of every kind is refused with an error that names the problem,
// and leaves the applied objects, the endpoints and the identities exactly
// as they were.
func TestBadInputIsRejectedWithoutChange(t *testing.T) {
	n := startNode(t)
	client := n.addPod("client", map[string]string{"app": "client"})
	n.addPod("server", map[string]string{"app": "server"})
	step(t, "apply Service web and NetworkPolicy server-from-client")
	n.apply(serverPolicy + "---\n" + service("web", `  vips: [10.96.0.10, "fd00:96::10"]
  ports: [{port: 80, targetPort: 8080}]
  selector: {app: server}
`))
	before := n.snapshot()

	// A spare pod namespace, so that a refused endpoint add fails for the
	// reason under test and not because the netns is taken.
	spare, err := n.lab.AddPodNetns("spare")
	if err != nil {
		t.Fatal(err)
	}

	cases := []struct {
		name string
		yaml string   // applied with isthmus apply -f, or
		args []string // run as isthmus args
		want []string // substrings of the error output
	}{{
		name: "malformed YAML",
		yaml: "apiVersion: isthmus.io/v1alpha1\nkind: Service\nmetadata: {name: broken\nspec: [\n",
		want: []string{"yaml", "line 3"},
	}, {
		name: "unknown kind",
		yaml: "apiVersion: isthmus.io/v1alpha1\nkind: Gateway\nmetadata: {name: gw}\nspec: {}\n",
		want: []string{`unknown kind "Gateway"`},
	}, {
		name: "unknown apiVersion",
		yaml: "apiVersion: v1\nkind: Service\nmetadata: {name: web2}\nspec: {}\n",
		want: []string{"apiVersion", `"v1"`},
	}, {
		name: "port 0",
		yaml: service("bad-port", "  vips: [10.96.0.40]\n  ports: [{port: 0}]\n  selector: {app: server}\n"),
		want: []string{"spec.ports[0].port", "got 0"},
	}, {
		name: "port 70000",
		yaml: service("bad-port", "  vips: [10.96.0.40]\n  ports: [{port: 70000}]\n  selector: {app: server}\n"),
		want: []string{"spec.ports[0].port", "70000"},
	}, {
		name: "policy port 70000",
		yaml: strings.Replace(serverPolicy, "port: 8080", "port: 70000", 1),
		want: []string{"spec.ingress[0].toPorts[0].port", "70000"},
	}, {
		name: "VIP is not an IP address",
		yaml: service("bad-vip", "  vips: [10.96.0.300]\n  ports: [{port: 80}]\n  selector: {app: server}\n"),
		want: []string{"spec.vips[0]", `"10.96.0.300"`},
	}, {
		name: "VIP is a CIDR",
		yaml: service("bad-vip", "  vips: [10.96.0.0/24]\n  ports: [{port: 80}]\n  selector: {app: server}\n"),
		want: []string{"spec.vips[0]", `"10.96.0.0/24"`},
	}, {
		name: "backend is not an IP address",
		yaml: service("bad-backend", "  vips: [10.96.0.41]\n  ports: [{port: 80}]\n  backends: [{ip: 10.244.1.999}]\n"),
		want: []string{"spec.backends[0].ip", `"10.244.1.999"`},
	}, {
		name: "VIP conflicts with service web",
		yaml: service("web-copy", "  vips: [10.96.0.10]\n  ports: [{port: 80, targetPort: 9090}]\n  selector: {app: client}\n"),
		want: []string{"10.96.0.10:80", "already used by", "default/web"},
	}, {
		name: "IPv6 VIP conflicts with service web",
		yaml: service("web-copy", "  vips: [\"fd00:96::10\"]\n  ports: [{port: 80, protocol: tcp}]\n  selector: {app: client}\n"),
		want: []string{"[fd00:96::10]:80", "already used by", "default/web"},
	}, {
		name: "two services of one input claim the same VIP",
		yaml: service("twin-a", "  vips: [10.96.0.50]\n  ports: [{port: 53, protocol: UDP}]\n  selector: {app: server}\n") +
			"---\n" + service("twin-b", "  vips: [10.96.0.50]\n  ports: [{port: 53, protocol: udp}]\n  selector: {app: client}\n"),
		want: []string{"10.96.0.50:53", "already used by", "default/twin-a"},
	}, {
		name: "a bad update of service web keeps the old one",
		yaml: service("web", "  vips: [10.96.0.10]\n  ports: [{port: 80, targetPort: 0, protocol: SCTP}]\n  selector: {app: server}\n"),
		want: []string{"spec.ports[0].protocol", `"SCTP"`},
	}, {
		name: "empty input",
		yaml: "# nothing here\n",
		want: []string{"no objects"},
	}, {
		name: "a valid object next to a bad one is not applied either",
		yaml: service("fresh", "  vips: [10.96.0.42]\n  ports: [{port: 80}]\n  selector: {app: server}\n") +
			"---\n" + service("bad-port", "  vips: [10.96.0.43]\n  ports: [{port: 0}]\n  selector: {app: server}\n"),
		want: []string{"document 2", "spec.ports[0].port"},
	}, {
		name: "unknown kind on the command line",
		args: []string{"get", "gateways"},
		want: []string{`unknown kind "gateways"`},
	}, {
		name: "delete a policy that does not exist",
		args: []string{"delete", "policy", "no-such-policy"},
		want: []string{"no-such-policy", "not found"},
	}, {
		name: "duplicate endpoint name",
		args: []string{"endpoint", "add", "client", "--netns", spare.Path(), "--labels", "app=client"},
		want: []string{"default/client", "already exists"},
	}, {
		name: "netns already used by another endpoint",
		args: []string{"endpoint", "add", "client-2", "--netns", client.Path(), "--labels", "app=client"},
		want: []string{client.Path(), "already used by endpoint default/client"},
	}, {
		name: "netns that does not exist",
		args: []string{"endpoint", "add", "ghost", "--netns", filepath.Join(lab.NetnsDir, n.lab.Name("ghost"))},
		want: []string{filepath.Join(lab.NetnsDir, n.lab.Name("ghost")), "does not exist"},
	}, {
		name: "endpoint name that is not a DNS label",
		args: []string{"endpoint", "add", "Bad_Name", "--netns", spare.Path()},
		want: []string{`"Bad_Name"`, "DNS label"},
	}}
	for _, c := range cases {
		t.Run(strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			var out string
			if c.yaml != "" {
				out = n.in(t).isthmusFails("apply", "-f", n.in(t).writeFile(c.yaml))
			} else {
				out = n.in(t).isthmusFails(c.args...)
			}
			t.Logf("isthmus said: %s", strings.TrimSpace(out))
			for _, w := range c.want {
				if !strings.Contains(out, w) {
					t.Errorf("error output does not name the problem: want %q in:\n%s", w, out)
				}
			}
			n.checkUnchanged(t, before)
		})
	}

	step(t, "the refused endpoint adds left the spare netns untouched")
	h, err := spare.Handle()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if links, err := h.LinkList(); err != nil {
		t.Fatal(err)
	} else {
		for _, lk := range links {
			if lk.Attrs().Name != "lo" {
				t.Errorf("spare netns has interface %s after refused endpoint adds", lk.Attrs().Name)
			}
		}
	}

	step(t, "an agent started with a bad --pod-cidr exits with an error naming it")
	bin := labtest.Binary(t, lab.AgentBinary)
	for _, c := range []struct {
		name  string
		cidrs []string
		want  []string
	}{
		{"prefix length 33", []string{"10.0.0.0/33"}, []string{"--pod-cidr", "10.0.0.0/33"}},
		{"not a CIDR", []string{"banana"}, []string{"--pod-cidr", "banana"}},
		{"host bits set", []string{"10.0.0.1/24"}, []string{"--pod-cidr", "10.0.0.1/24"}},
		{"two IPv4 CIDRs", []string{"10.1.0.0/24", "10.2.0.0/24"}, []string{"10.1.0.0/24", "10.2.0.0/24"}},
	} {
		t.Run("agent_"+strings.ReplaceAll(c.name, " ", "_"), func(t *testing.T) {
			dir := t.TempDir()
			name := n.lab.Name("bad")
			args := []string{bin, "--node-name", name, "--state-dir", filepath.Join(dir, "state"), "--socket", filepath.Join(dir, "agent.sock")}
			for _, cidr := range c.cidrs {
				args = append(args, "--pod-cidr", cidr)
			}
			p, err := n.node.Start(n.ctx, args...)
			if err != nil {
				t.Fatal(err)
			}
			select {
			case <-p.Done():
			case <-time.After(20 * time.Second):
				_ = p.Kill()
				t.Fatalf("agent with --pod-cidr %v still runs after 20 s; want it to refuse to start\n%s", c.cidrs, p.Log())
			}
			if err := p.Wait(); err == nil {
				t.Fatalf("agent with --pod-cidr %v exited 0; want an error\n%s", c.cidrs, p.Log())
			}
			log := p.Log()
			for _, w := range c.want {
				if !strings.Contains(log, w) {
					t.Errorf("agent's error does not name the problem: want %q in:\n%s", w, log)
				}
			}
			if _, err := os.Stat(filepath.Join(dir, "agent.sock")); err == nil {
				t.Errorf("the refused agent left a socket behind")
			}
			if _, err := os.Stat(filepath.Join(lab.PinRoot, name)); err == nil {
				t.Errorf("the refused agent created its pin dir %s", filepath.Join(lab.PinRoot, name))
			}
		})
	}
	n.checkUnchanged(t, before)
}
