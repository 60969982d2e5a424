// Package api is the agent's local API: HTTP with JSON bodies over a unix
// socket (mode 0600, so only root talks to the agent). The server side
// serves any Backend (the agent implements it); Client is the same API seen
// from the CLI, and implements Backend too.
//
//	POST   /v1/endpoints                          add an endpoint (EndpointRequest) -> Endpoint
//	DELETE /v1/endpoints/{namespace}/{name}       remove an endpoint
//	GET    /v1/endpoints                          -> []Endpoint
//	POST   /v1/apply                              YAML documents, all or nothing -> ApplyResult
//	GET    /v1/objects?kind=Service|NetworkPolicy -> []Object (every kind when empty)
//	DELETE /v1/objects/{kind}/{namespace}/{name}  remove an applied object
//	GET    /v1/identities                         -> []Identity
//	GET    /v1/status                             -> Status
//	GET    /healthz                               -> {"status":"ok"}
//	GET    /readyz                                -> {"status":"ready"}, or 503 naming what is not ready
//	GET    /metrics                               -> Prometheus text format (docs/metrics.md)
//
// Errors are {"error": "..."} with 400 for bad input, 404 for unknown
// objects, 409 for conflicts, 413 for bodies over 1 MiB and 500 otherwise.
// Request bodies are decoded strictly: unknown fields are rejected.
package api
