// Command demo is the README's main job on one machine: a node running
// isthmus-agent with a few pods, a service and a policy, checked end to end,
// then the agent's status. With -keep it stays up for exploring with the CLI
// until interrupted; everything is removed on exit.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/isthmus-mesh/isthmus/lab"
	"github.com/isthmus-mesh/isthmus/lab/labtest"
)

var keep = flag.Bool("keep", false, "keep the node running until interrupted")

const manifests = `apiVersion: isthmus.io/v1alpha1
kind: Service
metadata:
  name: web
  namespace: demo
spec:
  vips: [10.96.0.10, "fd00:96::10"]
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
  selector: {app: web}
---
apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata:
  name: web-from-client
  namespace: demo
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
    - fromEndpoints: [{matchLabels: {app: client}}]
      toPorts: [{port: 8080, protocol: TCP}]
`

func main() {
	flag.Parse()
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) { fmt.Printf("==> "+format+"\n", args...) }

func run() error {
	ctx, cancel := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer cancel()
	defer labtest.Cleanup()

	step("building binaries and creating a node namespace")
	l, err := lab.New(lab.Options{Logf: func(string, ...any) {}, Binaries: labtest.Binaries, CloseOnSignal: true})
	if err != nil {
		return err
	}
	defer l.Close()
	node, err := l.AddNode("node1")
	if err != nil {
		return err
	}
	step("starting isthmus-agent on %s", node.NodeName())
	agent, err := node.StartAgent(ctx, lab.AgentOptions{PodCIDRs: []netip.Prefix{
		netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("fd00:244:1::/64")}})
	if err != nil {
		return err
	}

	pods := map[string]*lab.Pod{}
	for _, p := range []struct{ name, app string }{{"web-1", "web"}, {"web-2", "web"}, {"client", "client"}, {"other", "other"}} {
		pod, err := agent.AddPod(ctx, p.name, "demo", map[string]string{"app": p.app})
		if err != nil {
			return err
		}
		pods[p.name] = pod
		step("pod demo/%s (app=%s): %s %s", p.name, p.app, pod.IPv4, pod.IPv6)
	}
	for _, name := range []string{"web-1", "web-2"} {
		if err := serveName(pods[name].Netns, name); err != nil {
			return err
		}
	}

	step("applying Service demo/web (10.96.0.10:80, fd00:96::10:80 -> app=web:8080) and NetworkPolicy demo/web-from-client")
	f, err := os.CreateTemp(l.Dir(), "demo-*.yaml")
	if err != nil {
		return err
	}
	f.WriteString(manifests)
	f.Close()
	if out, err := agent.CLI(ctx, "apply", "-f", f.Name()); err != nil {
		return err
	} else {
		fmt.Print(indent(string(out)))
	}

	step("checking the datapath")
	failed := 0
	check := func(what string, want bool, got string, err error) {
		ok := (err == nil) == want
		mark := "PASS"
		if !ok {
			mark = "FAIL"
			failed++
		}
		detail := got
		if err != nil {
			detail = "refused: " + shortErr(err)
		}
		fmt.Printf("    %-4s %-52s %s\n", mark, what, detail)
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		if _, err := fetch(pods["client"].Netns, "10.96.0.10:80"); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	seen := map[string]bool{}
	for i := 0; i < 20; i++ {
		if name, err := fetch(pods["client"].Netns, "10.96.0.10:80"); err == nil {
			seen[name] = true
		}
	}
	got, err := fetch(pods["client"].Netns, "10.96.0.10:80")
	check("client -> service 10.96.0.10:80", true, got, err)
	got, err = fetch(pods["client"].Netns, "[fd00:96::10]:80")
	check("client -> service [fd00:96::10]:80", true, got, err)
	check("service spreads over both backends (20 requests)", true, fmt.Sprint(len(seen), " backends answered"), boolErr(len(seen) == 2))
	got, err = fetch(pods["client"].Netns, netip.AddrPortFrom(pods["web-1"].IPv4, 8080).String())
	check("client -> web-1:8080 (allowed by policy)", true, got, err)
	got, err = fetch(pods["other"].Netns, netip.AddrPortFrom(pods["web-1"].IPv4, 8080).String())
	check("other -> web-1:8080 (denied by policy)", false, got, err)
	got, err = fetch(pods["other"].Netns, "10.96.0.10:80")
	check("other -> service (denied at the backend)", false, got, err)

	step("isthmus status")
	if out, err := agent.CLI(ctx, "status"); err == nil {
		fmt.Print(indent(string(out)))
	} else {
		return err
	}
	step("isthmus endpoint list")
	if out, err := agent.CLI(ctx, "endpoint", "list"); err == nil {
		fmt.Print(indent(string(out)))
	}
	if failed > 0 {
		return fmt.Errorf("%d checks failed", failed)
	}
	if *keep {
		step("running; explore with: isthmus --socket %s status   (Ctrl-C removes everything)", agent.Socket)
		<-ctx.Done()
	}
	step("tearing down")
	return nil
}

// serveName answers every TCP connection on :8080 with the pod's name.
func serveName(ns *lab.Netns, name string) error {
	var lns []net.Listener
	err := ns.Do(func() error {
		ln, err := net.Listen("tcp", ":8080")
		if err != nil {
			return err
		}
		lns = append(lns, ln)
		return nil
	})
	if err != nil {
		return err
	}
	for _, ln := range lns {
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				fmt.Fprintf(c, "%s\n", name)
				c.Close()
			}
		}()
	}
	return nil
}

func fetch(ns *lab.Netns, addr string) (string, error) {
	var out string
	err := ns.Do(func() error {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil && err != io.EOF {
			return err
		}
		out = strings.TrimSpace(line)
		return nil
	})
	return out, err
}

func boolErr(ok bool) error {
	if ok {
		return nil
	}
	return fmt.Errorf("no")
}

func shortErr(err error) string {
	s := err.Error()
	if i := strings.LastIndex(s, ": "); i >= 0 {
		s = s[i+2:]
	}
	return s
}

func indent(s string) string {
	var b strings.Builder
	for _, l := range strings.Split(strings.TrimRight(s, "\n"), "\n") {
		b.WriteString("    " + l + "\n")
	}
	return b.String()
}
