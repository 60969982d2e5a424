// Package e2e holds Isthmus's end-to-end tests on one node: a network
// namespace running a real isthmus-agent, pods attached to it with the
// isthmus CLI, and real TCP, UDP and ICMP traffic between them.
//
// Each test reads as a user story (pods talk; a policy lets only the client
// in; a service spreads load; the agent restarts under a running stream; bad
// input is refused and changes nothing). They need root, as CI has; without
// it they skip, except under CI=true where they fail (labtest.SkipUnlessRoot).
//
//	go test -count=1 -v ./tests/e2e/
package e2e
