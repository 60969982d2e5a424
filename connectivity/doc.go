// Package connectivity checks a mesh end to end with real TCP connections
// between pods: HTTP requests to echo servers (EchoHandler, ServeEcho) whose
// answers name the pod, node and cluster that served them.
//
// Run runs the checks against a Target:
//
//   - pod to pod on one node, across nodes, across clusters (IPv4 and IPv6);
//   - the global service from every cluster: backends of every cluster answer;
//   - a pod the policy does not admit is really denied, over IPv4 and
//     IPv6: every connection attempt times out, the datapath's drop
//     (Denial: an answer, a refusal, an unreachable route or any other
//     error fails the check), after the same targets answered an admitted
//     pod and the denied pod's own network was proven over the same
//     family, so the denial is the policy's;
//   - with WireGuard, an AF_PACKET capture on a node's underlay interface
//     during cross-node traffic sees WireGuard UDP and no packet with a pod
//     address (capture.go classifies the packets).
//
// A Target is the lab of `isthmus lab up` (lab.State.ConnectivityTarget) or,
// with NewAgentsTarget, the test's own pods, service and policy on any
// agents of this host, removed again by Target.Cleanup.
//
// A check that applies but has nothing to send (no address family in
// common, no echo pod, no target) fails; Skip is only for a kind of check
// that cannot apply (one node, one cluster, encryption off).
//
// Every Result carries its Evidence: each Probe (what a pod sent to which
// address, who answered how often, what failed and how) and, for the
// encryption check, the CaptureResult. `isthmus connectivity test -v`
// prints it; -o json has it under "evidence".
package connectivity
