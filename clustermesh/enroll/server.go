package enroll

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
	"github.com/isthmus-mesh/isthmus/clustermesh/records"
)

// DefaultTrustDomain is the SPIFFE trust domain of hosts' certificates.
const DefaultTrustDomain = "isthmus.io"

// DefaultCertValidity is how long a host's certificate is valid; the host
// renews it at two thirds of that.
const DefaultCertValidity = 24 * time.Hour

// Issuer signs hosts' certificates and makes their etcd users: the
// cluster's etcdserver.Server.
type Issuer interface {
	IssueVMCredential(ctx context.Context, node, user string, csrPEM []byte, spiffe *url.URL, validity time.Duration) (etcdserver.Bundle, *x509.Certificate, error)
}

// Config configures the enrollment service of a cluster's server.
type Config struct {
	Cluster   string
	ClusterID uint32
	PodCIDRs  []netip.Prefix // the cluster's
	// VMCIDRs are where hosts' addresses come from (requested or
	// allocated); each lies inside PodCIDRs, so the records of hosts pass
	// every cluster's checks like a node's pod CIDR, and outside every
	// node's pod CIDR (the operator's part, as for nodes' CIDRs).
	VMCIDRs      []netip.Prefix
	TrustDomain  string
	CertValidity time.Duration
	KV           *kvstore.Client
	Issuer       Issuer
	Log          *slog.Logger
}

// Service answers enrollment and renewal requests.
type Service struct{ cfg Config }

// New checks cfg.
func New(cfg Config) (*Service, error) {
	if cfg.TrustDomain == "" {
		cfg.TrustDomain = DefaultTrustDomain
	}
	if cfg.CertValidity <= 0 {
		cfg.CertValidity = DefaultCertValidity
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if err := CheckVMCIDRs(cfg.VMCIDRs, cfg.PodCIDRs); err != nil {
		return nil, err
	}
	return &Service{cfg: cfg}, nil
}

// CheckVMCIDRs: every VM CIDR inside one of the cluster's pod CIDRs, at
// most one per family.
func CheckVMCIDRs(vm, pods []netip.Prefix) error {
	seen := map[bool]bool{}
	for _, v := range vm {
		if seen[v.Addr().Is4()] {
			return fmt.Errorf("--vm-cidr %s: at most one IPv4 and one IPv6 VM CIDR", v)
		}
		seen[v.Addr().Is4()] = true
		if !slices.ContainsFunc(pods, func(p netip.Prefix) bool { return p.Bits() <= v.Bits() && p.Contains(v.Addr()) }) {
			return fmt.Errorf("--vm-cidr %s is not inside the cluster's pod CIDRs %v: hosts' records would be refused by every node", v, pods)
		}
	}
	return nil
}

// SPIFFEID returns spiffe://<trust-domain>/cluster/<cluster>/vm/<name>.
func SPIFFEID(trustDomain, cluster, name string) *url.URL {
	return &url.URL{Scheme: "spiffe", Host: trustDomain, Path: "/cluster/" + cluster + "/vm/" + name}
}

// EnrollRequest is POSTed to /v1/enroll.
type EnrollRequest struct {
	Token string `json:"token"`
	CSR   string `json:"csr"` // PEM; the host keeps its key
	// NodeIPs are the host's underlay addresses, for the status.
	NodeIPs []netip.Addr `json:"nodeIPs,omitempty"`
}

// RenewRequest is POSTed to /v1/renew over TLS with the host's current
// certificate.
type RenewRequest struct {
	CSR string `json:"csr"`
}

// Enrollment is what a host gets: who it is and how to reach its
// cluster's etcd.
type Enrollment struct {
	Name      string            `json:"name"`
	Namespace string            `json:"namespace"`
	Labels    map[string]string `json:"labels,omitempty"`
	Node      string            `json:"node"`
	Cluster   string            `json:"cluster"`
	ClusterID uint32            `json:"clusterID"`
	Addresses []netip.Addr      `json:"addresses"`
	Endpoints []string          `json:"endpoints"`
	User      string            `json:"user"`
	CACert    string            `json:"caCert"`
	Cert      string            `json:"cert"`
	Expires   time.Time         `json:"expires"`
	SPIFFEID  string            `json:"spiffeID"`
}

// Error is the body of a refused request.
type Error struct {
	Error string `json:"error"`
}

// Handler serves POST /v1/enroll and POST /v1/renew.
func (s *Service) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/enroll", func(w http.ResponseWriter, r *http.Request) {
		var req EnrollRequest
		if err := decode(r, &req); err != nil {
			reply(w, http.StatusBadRequest, nil, err)
			return
		}
		e, code, err := s.Enroll(r.Context(), req)
		if err != nil {
			s.cfg.Log.Warn("enrollment refused", "remote", r.RemoteAddr, "err", err)
		}
		reply(w, code, e, err)
	})
	mux.HandleFunc("POST /v1/renew", func(w http.ResponseWriter, r *http.Request) {
		var req RenewRequest
		if err := decode(r, &req); err != nil {
			reply(w, http.StatusBadRequest, nil, err)
			return
		}
		if r.TLS == nil || len(r.TLS.VerifiedChains) == 0 {
			reply(w, http.StatusUnauthorized, nil, errors.New("renewal needs the host's current certificate (TLS client certificate of this cluster's CA)"))
			return
		}
		e, code, err := s.Renew(r.Context(), r.TLS.VerifiedChains[0][0], req)
		if err != nil {
			s.cfg.Log.Warn("renewal refused", "remote", r.RemoteAddr, "err", err)
		}
		reply(w, code, e, err)
	})
	return mux
}

func decode(r *http.Request, v any) error {
	dec := json.NewDecoder(http.MaxBytesReader(nil, r.Body, 64<<10))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("request: %w", err)
	}
	return nil
}

func reply(w http.ResponseWriter, code int, v any, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	if err != nil {
		json.NewEncoder(w).Encode(Error{Error: err.Error()})
		return
	}
	json.NewEncoder(w).Encode(v)
}

// Enroll checks the token and, if it holds, consumes it, marks the
// workload enrolled with its addresses (all in one etcd transaction), and
// issues the host's credential. Every refusal changes nothing.
func (s *Service) Enroll(ctx context.Context, req EnrollRequest) (*Enrollment, int, error) {
	cluster, name, err := ParseToken(req.Token)
	if err != nil {
		return nil, http.StatusBadRequest, err
	}
	if cluster != s.cfg.Cluster {
		return nil, http.StatusForbidden, fmt.Errorf("the token is for cluster %q; this server is cluster %q", cluster, s.cfg.Cluster)
	}
	for attempt := 0; ; attempt++ {
		e, code, err, retry := s.enrollOnce(ctx, name, req)
		if !retry || attempt >= 3 {
			return e, code, err
		}
	}
}

func (s *Service) enrollOnce(ctx context.Context, name string, req EnrollRequest) (*Enrollment, int, error, bool) {
	tkey := TokenKey(req.Token)
	tr, found, err := s.cfg.KV.Get(ctx, tkey)
	if err != nil {
		return nil, http.StatusServiceUnavailable, err, false
	}
	if !found {
		return nil, http.StatusForbidden, errors.New("unknown token: forged, mistyped, or revoked"), false
	}
	var t TokenRecord
	if err := json.Unmarshal(tr.Value, &t); err != nil {
		return nil, http.StatusForbidden, errors.New("unknown token: unreadable record"), false
	}
	switch {
	case t.Name != name || t.Cluster != s.cfg.Cluster:
		return nil, http.StatusForbidden, errors.New("unknown token: it does not match its record"), false
	case !t.Used.IsZero():
		return nil, http.StatusForbidden, fmt.Errorf("token already used (at %s): tokens enroll once; create a new one", t.Used.Format(time.RFC3339)), false
	case time.Now().After(t.Expires):
		return nil, http.StatusForbidden, fmt.Errorf("token expired at %s: create a new one", t.Expires.Format(time.RFC3339)), false
	}
	w, wrev, err := Get(ctx, s.cfg.KV, name)
	if err != nil {
		return nil, http.StatusServiceUnavailable, err, false
	}
	if wrev == 0 {
		return nil, http.StatusForbidden, fmt.Errorf("the ExternalWorkload %q of this token no longer exists", name), false
	}
	if w.Status.Enrolled {
		return nil, http.StatusConflict, fmt.Errorf("workload %s is already enrolled: revoke it first to enroll it again", name), false
	}
	addrs, claims, err := s.addresses(ctx, w)
	if err != nil {
		return nil, http.StatusConflict, err, false
	}
	gen, grev, err := generation(ctx, s.cfg.KV, name)
	if err != nil {
		return nil, http.StatusServiceUnavailable, err, false
	}
	now := time.Now().UTC()
	t.Used = now
	tdata, _ := json.Marshal(t)
	w.Status = objects.ExternalWorkloadStatus{Enrolled: true, Addresses: addrs, NodeAddresses: req.NodeIPs, EnrolledAt: now, LastSeen: now,
		Generation: gen + 1}
	conds := []kvstore.Cond{kvstore.KeyModRevision(tkey, tr.ModRevision), kvstore.KeyModRevision(WorkloadKey(name), wrev)}
	conds = append(conds, kvstore.KeyModRevision(GenerationKey(name), grev))
	ops := []kvstore.Op{kvstore.OpPut(tkey, tdata), kvstore.OpPut(GenerationKey(name), []byte(strconv.Itoa(gen+1)))}
	for _, a := range claims {
		conds = append(conds, kvstore.KeyMissing(AddressKey(a)))
		ops = append(ops, kvstore.OpPut(AddressKey(a), []byte(name)))
	}
	// Issued before the transaction would leave a credential behind a
	// refused enrollment; after it, a failed issue is undone below.
	wdata, _ := json.Marshal(w)
	ops = append(ops, kvstore.OpPut(WorkloadKey(name), wdata))
	ok, err := s.cfg.KV.Txn(ctx, conds, ops)
	if err != nil {
		return nil, http.StatusServiceUnavailable, err, false
	}
	if !ok {
		return nil, http.StatusConflict, errors.New("the token, the workload or an address changed meanwhile"), true
	}
	node := NodeName(name)
	id := SPIFFEID(s.cfg.TrustDomain, s.cfg.Cluster, name)
	b, cert, err := s.cfg.Issuer.IssueVMCredential(ctx, node, records.EnrollmentUser(node, w.Status.Generation), []byte(req.CSR), id, s.cfg.CertValidity)
	if err != nil {
		// Undo the enrollment (the token stays used: it was spent on a
		// request that could not be served, e.g. a bad CSR).
		w.Status.Enrolled = false
		wdata, _ := json.Marshal(w)
		_ = s.cfg.KV.Put(ctx, WorkloadKey(name), wdata)
		return nil, http.StatusBadRequest, fmt.Errorf("issue the host's certificate: %w", err), false
	}
	w.Status.CertificateExpiry = cert.NotAfter.UTC()
	wdata, _ = json.Marshal(w)
	if err := s.cfg.KV.Put(ctx, WorkloadKey(name), wdata); err != nil {
		s.cfg.Log.Warn("enrollment: cannot record the certificate expiry", "workload", name, "err", err)
	}
	s.cfg.Log.Info("host enrolled", "workload", name, "node", node, "addresses", addrs, "spiffeID", id.String(), "expires", cert.NotAfter)
	return s.enrollment(w, b, cert, id), http.StatusOK, nil, false
}

func (s *Service) enrollment(w objects.ExternalWorkload, b etcdserver.Bundle, cert *x509.Certificate, id *url.URL) *Enrollment {
	return &Enrollment{
		Name: w.Metadata.Name, Namespace: w.Metadata.Namespace, Labels: w.Metadata.Labels,
		Node: NodeName(w.Metadata.Name), Cluster: s.cfg.Cluster, ClusterID: s.cfg.ClusterID,
		Addresses: w.Status.Addresses, Endpoints: b.Endpoints, User: b.User,
		CACert: string(b.CACert), Cert: string(b.Cert), Expires: cert.NotAfter.UTC(), SPIFFEID: id.String(),
	}
}

// addresses returns the workload's addresses (kept from an earlier
// enrollment, requested, or allocated from the VM CIDRs) and those of them
// that still need a claim.
func (s *Service) addresses(ctx context.Context, w objects.ExternalWorkload) (addrs, claims []netip.Addr, err error) {
	kvs, _, err := s.cfg.KV.GetPrefix(ctx, AddressesPrefix)
	if err != nil {
		return nil, nil, err
	}
	owner := map[netip.Addr]string{}
	for _, r := range kvs {
		if a, err := netip.ParseAddr(strings.TrimPrefix(r.Key, AddressesPrefix)); err == nil {
			owner[a] = string(r.Value)
		}
	}
	name := w.Metadata.Name
	req4, req6 := w.Requested()
	for _, v := range s.cfg.VMCIDRs {
		want := req6
		if v.Addr().Is4() {
			want = req4
		}
		if !want.IsValid() {
			// An address this workload already holds in this family.
			for a, o := range owner {
				if o == name && v.Contains(a) {
					want = a
				}
			}
		}
		if want.IsValid() {
			if !v.Contains(want) {
				return nil, nil, fmt.Errorf("requested address %s is outside the cluster's VM CIDR %s", want, v)
			}
			if o, ok := owner[want]; ok && o != name {
				return nil, nil, fmt.Errorf("requested address %s is taken by workload %s", want, o)
			}
		} else {
			// First free address, past the network address and the first
			// host address (as node IPAM does).
			for a := v.Addr().Next().Next(); v.Contains(a); a = a.Next() {
				if _, taken := owner[a]; !taken {
					want = a
					break
				}
			}
			if !want.IsValid() {
				return nil, nil, fmt.Errorf("VM CIDR %s is full", v)
			}
		}
		addrs = append(addrs, want)
		if owner[want] != name {
			claims = append(claims, want)
		}
	}
	for _, a := range []netip.Addr{req4, req6} {
		if a.IsValid() && !slices.Contains(addrs, a) {
			return nil, nil, fmt.Errorf("requested address %s: the cluster has no VM CIDR of its family (isthmus-clustermesh --vm-cidr)", a)
		}
	}
	if len(addrs) == 0 {
		return nil, nil, errors.New("the cluster has no VM CIDR (isthmus-clustermesh --vm-cidr): no address to give")
	}
	return addrs, claims, nil
}

// Renew issues a new certificate to an enrolled host that presents its
// current one.
func (s *Service) Renew(ctx context.Context, cert *x509.Certificate, req RenewRequest) (*Enrollment, int, error) {
	name, err := s.workloadOf(cert)
	if err != nil {
		return nil, http.StatusForbidden, err
	}
	w, rev, err := Get(ctx, s.cfg.KV, name)
	if err != nil {
		return nil, http.StatusServiceUnavailable, err
	}
	user := records.EnrollmentUser(NodeName(name), w.Status.Generation)
	if rev == 0 || !w.Status.Enrolled {
		return nil, http.StatusForbidden, fmt.Errorf("workload %s is not enrolled (revoked or deleted)", name)
	}
	if cert.Subject.CommonName != user {
		// A certificate of an earlier, revoked enrollment of the name.
		return nil, http.StatusForbidden, fmt.Errorf("the certificate is of an earlier enrollment of %s (revoked)", name)
	}
	id := SPIFFEID(s.cfg.TrustDomain, s.cfg.Cluster, name)
	b, nc, err := s.cfg.Issuer.IssueVMCredential(ctx, NodeName(name), user, []byte(req.CSR), id, s.cfg.CertValidity)
	if err != nil {
		return nil, http.StatusBadRequest, err
	}
	w.Status.LastSeen, w.Status.CertificateExpiry = time.Now().UTC(), nc.NotAfter.UTC()
	data, _ := json.Marshal(w)
	// Only if still enrolled: a revocation meanwhile wins.
	ok, err := s.cfg.KV.Txn(ctx, []kvstore.Cond{kvstore.KeyModRevision(WorkloadKey(name), rev)}, []kvstore.Op{kvstore.OpPut(WorkloadKey(name), data)})
	if err != nil || !ok {
		return nil, http.StatusConflict, errors.New("the workload changed during the renewal; try again")
	}
	return s.enrollment(w, b, nc, id), http.StatusOK, nil
}

// workloadOf returns the workload name in a host certificate's SPIFFE ID,
// which must be of this trust domain and cluster.
func (s *Service) workloadOf(cert *x509.Certificate) (string, error) {
	for _, u := range cert.URIs {
		if u.Scheme != "spiffe" || u.Host != s.cfg.TrustDomain {
			continue
		}
		rest, ok := strings.CutPrefix(u.Path, "/cluster/"+s.cfg.Cluster+"/vm/")
		if ok && records.ValidateNodeName(NodeName(rest)) == nil && records.IsEnrollmentUser(cert.Subject.CommonName, NodeName(rest)) {
			return rest, nil
		}
	}
	return "", errors.New("the client certificate is not a host certificate of this cluster")
}
