package objects

import (
	"bytes"
	"encoding/json"
	"reflect"
	"strings"
	"testing"
)

const webService = `apiVersion: isthmus.io/v1alpha1
kind: Service
metadata:
  name: web
spec:
  vips: ["10.96.0.10", "fd00:96::10"]
  ports:
  - name: http
    port: 80
    targetPort: 8080
  - port: 53
    protocol: udp
  selector:
    app: web
`

const denyPolicy = `apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata:
  name: db
  namespace: prod
  labels:
    team: storage
spec:
  endpointSelector:
    matchLabels:
      app: db
  ingress:
  - fromEndpoints:
    - matchLabels:
        app: web
    fromEntities: [Host]
    toPorts:
    - port: 5432
    - protocol: icmp
  egress:
  - toEntities: [world]
`

func TestDecodeValid(t *testing.T) {
	objs, err := Decode([]byte("# leading comment\n---\n" + webService + "--- # second\n" + denyPolicy + "---\n\n---\n"))
	if err != nil {
		t.Fatalf("Decode: %v", err)
	}
	if len(objs) != 2 {
		t.Fatalf("got %d objects, want 2", len(objs))
	}
	svc, ok := objs[0].(*Service)
	if !ok {
		t.Fatalf("object 0 is %T", objs[0])
	}
	want := Service{
		APIVersion: APIVersion,
		Kind:       KindService,
		Metadata:   Meta{Name: "web", Namespace: "default"},
		Spec: ServiceSpec{
			VIPs: []string{"10.96.0.10", "fd00:96::10"},
			Ports: []ServicePort{
				{Name: "http", Port: 80, TargetPort: 8080, Protocol: "TCP"},
				{Port: 53, Protocol: "UDP"},
			},
			Selector: map[string]string{"app": "web"},
		},
	}
	if !reflect.DeepEqual(*svc, want) {
		t.Errorf("service:\n got %+v\nwant %+v", *svc, want)
	}
	if Key(svc) != "Service/default/web" {
		t.Errorf("Key = %q", Key(svc))
	}

	pol, ok := objs[1].(*NetworkPolicy)
	if !ok {
		t.Fatalf("object 1 is %T", objs[1])
	}
	wantPol := NetworkPolicy{
		APIVersion: APIVersion,
		Kind:       KindNetworkPolicy,
		Metadata:   Meta{Name: "db", Namespace: "prod", Labels: map[string]string{"team": "storage"}},
		Spec: PolicySpec{
			EndpointSelector: Selector{MatchLabels: map[string]string{"app": "db"}},
			Ingress: []IngressRule{{
				FromEndpoints: []Selector{{MatchLabels: map[string]string{"app": "web"}}},
				FromEntities:  []string{"host"},
				ToPorts:       []PortRule{{Port: 5432, Protocol: "TCP"}, {Protocol: "ICMP"}},
			}},
			Egress: []EgressRule{{ToEntities: []string{"world"}}},
		},
	}
	if !reflect.DeepEqual(*pol, wantPol) {
		t.Errorf("policy:\n got %+v\nwant %+v", *pol, wantPol)
	}
	if Key(pol) != "NetworkPolicy/prod/db" {
		t.Errorf("Key = %q", Key(pol))
	}
}

func TestDecodeJSONAndMarkers(t *testing.T) {
	tests := []struct {
		name  string
		input string
		want  int
	}{
		{"json", `{"apiVersion":"isthmus.io/v1alpha1","kind":"Service","metadata":{"name":"a"},"spec":{"vips":["10.0.0.1"],"ports":[{"port":1}],"backends":[{"ip":"10.1.0.1"}]}}`, 1},
		{"content after marker", "--- {apiVersion: isthmus.io/v1alpha1, kind: Service, metadata: {name: a}, spec: {vips: [10.0.0.1], ports: [{port: 1}], backends: [{ip: 10.1.0.1}]}}\n", 1},
		{"crlf", strings.ReplaceAll(webService+"---\r\n"+denyPolicy, "\n", "\r\n"), 2},
		{"marker with trailing blanks", webService + "---   \n" + denyPolicy, 2},
		{"document end marker", webService + "...\n" + denyPolicy, 2},
		{"null document", "~\n---\n" + webService, 1},
		{"bom", "\xef\xbb\xbf" + webService, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			objs, err := Decode([]byte(tt.input))
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if len(objs) != tt.want {
				t.Fatalf("got %d objects, want %d", len(objs), tt.want)
			}
		})
	}
}

func TestDecodeErrors(t *testing.T) {
	svc := func(spec string) string {
		return "apiVersion: isthmus.io/v1alpha1\nkind: Service\nmetadata:\n  name: web\nspec:\n" + spec
	}
	pol := func(spec string) string {
		return "apiVersion: isthmus.io/v1alpha1\nkind: NetworkPolicy\nmetadata:\n  name: p\n  namespace: prod\nspec:\n" + spec
	}
	const okPorts = "  ports: [{port: 80}]\n"
	const okSel = "  selector: {app: web}\n"
	tests := []struct {
		name  string
		input string
		want  string
	}{
		{"empty input", "", "no objects"},
		{"only comments", "# nothing\n---\n# here\n", "no objects"},
		{"yaml syntax", "a: [\n", "document 1 (line 1): yaml"},
		{"duplicate key", "kind: Service\nkind: Service\n", `document 1 (line 1)`},
		{"scalar document", "hello\n", `document 1: must be a mapping with apiVersion, kind, metadata and spec, got "hello"`},
		{"list document", "- a\n", "document 1: must be a mapping"},
		{"missing apiVersion", "kind: Service\nmetadata: {name: web}\n", `document 1 (Service default/web): apiVersion: required`},
		{"wrong apiVersion", "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n", `apiVersion: must be "isthmus.io/v1alpha1", got "v1"`},
		{"numeric apiVersion", "apiVersion: 1\nkind: Service\n", `apiVersion: must be "isthmus.io/v1alpha1", got number 1`},
		{"missing kind", "apiVersion: isthmus.io/v1alpha1\n", "kind: required"},
		{"unknown kind", "apiVersion: isthmus.io/v1alpha1\nkind: Pod\nmetadata: {name: x, namespace: ns}\n", `document 1 (Pod ns/x): kind: unknown kind "Pod"`},
		{"lower-case kind", "apiVersion: isthmus.io/v1alpha1\nkind: service\n", `unknown kind "service"`},
		{"unknown top field", svc("  vips: [10.0.0.1]\n"+okPorts+okSel) + "state: {}\n", "document 1 (Service default/web): state: unknown field"},
		{"unknown status field", svc("  vips: [10.0.0.1]\n"+okPorts+okSel) + "status: {lb: 1}\n", "status.lb: unknown field"},
		{"bad type", svc("  vips: [10.0.0.1]\n" + okPorts + okSel + "  type: nodeport\n"), `spec.type: must be ClusterIP, NodePort or LoadBalancer, got "nodeport"`},
		{"node port missing", svc("  vips: [10.0.0.1]\n" + okPorts + okSel + "  type: NodePort\n"), "spec.ports[0].nodePort: required for spec.type NodePort (Isthmus does not allocate node ports): pick one in 30000-32767"},
		{"node port below range", svc("  vips: [10.0.0.1]\n  ports: [{port: 80, nodePort: 8080}]\n" + okSel + "  type: NodePort\n"), "spec.ports[0].nodePort: must be in 30000-32767, got 8080"},
		{"node port above range", svc("  vips: [10.0.0.1]\n  ports: [{port: 80, nodePort: 32768}]\n" + okSel + "  type: LoadBalancer\n"), "spec.ports[0].nodePort: must be in 30000-32767, got 32768"},
		{"node port twice", svc("  vips: [10.0.0.1]\n  ports: [{port: 80, nodePort: 30080}, {port: 81, nodePort: 30080}]\n" + okSel + "  type: NodePort\n"), "spec.ports[1].nodePort: node port 30080/TCP is already used by spec.ports[0]"},
		{"node port too large", svc("  vips: [10.0.0.1]\n  ports: [{port: 80, nodePort: 70000}]\n" + okSel + "  type: NodePort\n"), "spec.ports[0].nodePort: must be an integer 0-65535, got 70000"},
		{"lb ips without type", svc("  vips: [10.0.0.1]\n" + okPorts + okSel + "  loadBalancerIPs: [192.0.2.1]\n"), "spec.loadBalancerIPs: needs spec.type LoadBalancer"},
		{"two lb ips of a family", svc("  vips: [10.0.0.1]\n" + okPorts + okSel + "  type: LoadBalancer\n  loadBalancerIPs: [192.0.2.1, 192.0.2.2]\n"), `spec.loadBalancerIPs[1]: at most one IPv4 address allowed`},
		{"external ip equals vip", svc("  vips: [10.0.0.1]\n" + okPorts + okSel + "  externalIPs: [10.0.0.1]\n"), "spec.externalIPs[0]: 10.0.0.1 is already listed in spec.vips"},
		{"bad traffic policy", svc("  vips: [10.0.0.1]\n" + okPorts + okSel + "  externalTrafficPolicy: local\n"), `spec.externalTrafficPolicy: must be Cluster or Local, got "local"`},
		{"node port without type", svc("  vips: [10.0.0.1]\n  ports: [{port: 80, nodePort: 30080}]\n" + okSel), "spec.ports[0].nodePort: needs spec.type NodePort or LoadBalancer"},
		{"unknown nested field", svc("  vips: [10.0.0.1]\n  ports: [{port: 80, nodeport: 30080}]\n" + okSel), "spec.ports[0].nodeport: unknown field"},
		{"wrong case field", svc("  VIPs: [10.0.0.1]\n" + okPorts + okSel), "spec.VIPs: unknown field"},
		{"port too large", svc("  vips: [10.0.0.1]\n  ports: [{port: 70000}]\n" + okSel), "spec.ports[0].port: must be an integer 0-65535, got 70000"},
		{"port negative", svc("  vips: [10.0.0.1]\n  ports: [{port: -1}]\n" + okSel), "spec.ports[0].port: must be an integer 0-65535, got -1"},
		{"port string", svc("  vips: [10.0.0.1]\n  ports: [{port: http}]\n" + okSel), `spec.ports[0].port: must be a number, got "http"`},
		{"port zero", svc("  vips: [10.0.0.1]\n  ports: [{port: 0}]\n" + okSel), "document 1 (Service default/web): spec.ports[0].port: must be 1-65535, got 0"},
		{"vips not a list", svc("  vips: 10.0.0.1\n" + okPorts + okSel), `spec.vips: must be a list, got "10.0.0.1"`},
		{"numeric label value", svc("  vips: [10.0.0.1]\n" + okPorts + "  selector: {version: 1.0}\n"), `spec.selector["version"]: must be a string, got number 1 (quote it)`},
		{"boolean label value", svc("  vips: [10.0.0.1]\n" + okPorts + "  selector: {enabled: yes}\n"), `spec.selector["enabled"]: must be a string, got boolean true`},
		{"spec not a mapping", svc("  - a\n"), "spec: must be a mapping, got a list"},
		{"second document bad", "---\n" + svc("  vips: [10.0.0.1]\n"+okPorts+okSel) + "---\n" + svc("  vips: [10.0.0.1]\n  ports: [{port: 0}]\n"+okSel),
			"document 2 (Service default/web): spec.ports[0].port: must be 1-65535"},
		{"policy without rules", pol("  endpointSelector: {}\n"), "document 1 (NetworkPolicy prod/p): spec: needs at least one ingress or egress rule"},
		{"policy bad entity", pol("  ingress: [{fromEntities: [everyone]}]\n"), `spec.ingress[0].fromEntities[0]: must be one of host, remote-node, world, all, cluster, got "everyone"`},
		{"policy bad protocol", pol("  egress: [{toPorts: [{port: 1, protocol: sctp}]}]\n"), `spec.egress[0].toPorts[0].protocol: must be TCP, UDP, ICMP or ANY, got "sctp"`},
		{"policy icmp port", pol("  egress: [{toPorts: [{port: 8, protocol: ICMP}]}]\n"), `spec.egress[0].toPorts[0].port: must be 0 or absent for ICMP, got 8`},
		{"policy unknown rule field", pol("  ingress: [{from: []}]\n"), `spec.ingress[0].from: unknown field`},
		{"bad name", "apiVersion: isthmus.io/v1alpha1\nkind: Service\nmetadata: {name: Web}\n", `document 1 (Service default/Web): metadata.name: must be a DNS-1123 label`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			objs, err := Decode([]byte(tt.input))
			if err == nil {
				t.Fatalf("Decode succeeded with %d objects, want error containing %q", len(objs), tt.want)
			}
			if objs != nil {
				t.Errorf("Decode returned objects along with error %v", err)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("error %q\n does not contain %q", err, tt.want)
			}
		})
	}
}

func TestSplitDocuments(t *testing.T) {
	tests := []struct {
		name  string
		input string
		texts []string
		lines []int
	}{
		{"none", "a: 1\n", []string{"a: 1\n"}, []int{1}},
		{"two", "a: 1\n---\nb: 2\n", []string{"a: 1\n", "b: 2\n"}, []int{1, 3}},
		{"comment", "---  # x\nb: 2\n", []string{"", "b: 2\n"}, []int{1, 2}},
		{"content", "a: 1\n--- {b: 2}\n", []string{"a: 1\n", "{b: 2}\n"}, []int{1, 2}},
		{"not a marker", "a: ---\n----\n --- \n", []string{"a: ---\n----\n --- \n"}, []int{1}},
		{"no trailing newline", "a\n---", []string{"a\n", ""}, []int{1, 3}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			docs := splitDocuments([]byte(tt.input))
			if len(docs) != len(tt.texts) {
				t.Fatalf("got %d documents, want %d: %+v", len(docs), len(tt.texts), docs)
			}
			for i, d := range docs {
				if string(d.text) != tt.texts[i] || d.line != tt.lines[i] {
					t.Errorf("doc %d = %q at line %d, want %q at line %d", i, d.text, d.line, tt.texts[i], tt.lines[i])
				}
			}
		})
	}
}

func FuzzDecode(f *testing.F) {
	for _, s := range []string{
		"", "---", webService, denyPolicy, webService + "---\n" + denyPolicy,
		"apiVersion: isthmus.io/v1alpha1\nkind: Service\n",
		"a: [", "- 1\n- 2\n", "{}", "null", "--- |\n  text\n",
		"apiVersion: isthmus.io/v1alpha1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec: {ingress: [{}]}\n",
		"apiVersion: isthmus.io/v1alpha1\nkind: Service\nmetadata: {name: x}\nspec: {vips: [::1], ports: [{port: 99999999999999999999}]}\n",
		"a: &a [*a]\n", "<<: {a: 1}\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		objs, err := Decode(data)
		if err != nil {
			if objs != nil {
				t.Fatal("objects returned with an error")
			}
			return
		}
		if len(objs) == 0 {
			t.Fatal("no error and no objects")
		}
		for _, o := range objs {
			if err := o.Validate(); err != nil {
				t.Fatalf("decoded object does not validate: %v", err)
			}
			if o.GetMeta().Namespace == "" {
				t.Fatal("namespace not defaulted")
			}
			if s, ok := o.(*Service); ok {
				if _, err := s.Frontends(); err != nil {
					t.Fatalf("valid service has bad frontends: %v", err)
				}
			}
		}
	})
}

func TestDecodeExpressionsAndPolicyTypes(t *testing.T) {
	objs, err := Decode([]byte(`apiVersion: isthmus.io/v1alpha1
kind: NetworkPolicy
metadata:
  name: deny
spec:
  policyTypes: [Ingress, Egress]
  endpointSelector:
    matchExpressions:
    - {key: app, operator: In, values: [db]}
  ingress:
  - fromEndpoints:
    - matchExpressions:
      - {key: isthmus.io/namespace, operator: Exists}
`))
	if err != nil {
		t.Fatalf("Decode: %v", err)
	}
	spec := objs[0].(*NetworkPolicy).Spec
	want := PolicySpec{
		EndpointSelector: Selector{MatchExpressions: []LabelSelectorRequirement{{Key: "app", Operator: OpIn, Values: []string{"db"}}}},
		Ingress:          []IngressRule{{FromEndpoints: []Selector{{MatchExpressions: []LabelSelectorRequirement{{Key: "isthmus.io/namespace", Operator: OpExists}}}}}},
		PolicyTypes:      []string{"Ingress", "Egress"},
	}
	if !reflect.DeepEqual(spec, want) {
		t.Errorf("spec:\n got %+v\nwant %+v", spec, want)
	}
	_, err = Decode([]byte("apiVersion: isthmus.io/v1alpha1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec:\n  policyTypes: [Ingress]\n  endpointSelector:\n    matchExpressions:\n    - {key: app, operator: In, value: [db]}\n"))
	if err == nil || !strings.Contains(err.Error(), "spec.endpointSelector.matchExpressions[0].value: unknown field") {
		t.Errorf("unknown field: %v", err)
	}
}

// TestDecodeDropsStatus: status is Isthmus's to write; a document's status
// (from `get -o yaml`, say) is accepted and dropped, never trusted.
func TestDecodeDropsStatus(t *testing.T) {
	in := "apiVersion: isthmus.io/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec:\n  vips: [10.0.0.1]\n  ports: [{port: 80}]\n  type: LoadBalancer\n" +
		"status:\n  loadBalancer:\n    ingress: [{ip: 192.0.2.9}]\n"
	objs, err := Decode([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	svc := objs[0].(*Service)
	if len(svc.Status.LoadBalancer.Ingress) != 0 {
		t.Fatalf("status survived Decode: %+v", svc.Status)
	}
	if !svc.Spec.IsLoadBalancer() || svc.Spec.ExternalTraffic() != TrafficPolicyCluster {
		t.Fatalf("spec = %+v", svc.Spec)
	}
}

// The JSON fast path decodes what the YAML path decodes, and leaves what
// it does not take exactly (duplicate keys, trailing data) to the YAML
// path's errors.
func TestDecodeJSONFastPath(t *testing.T) {
	const js = `{"apiVersion":"isthmus.io/v1alpha1","kind":"Service","metadata":{"name":"web","labels":{"a":"1"}},` +
		`"spec":{"type":"LoadBalancer","vips":["10.96.0.10"],"ports":[{"port":80,"targetPort":8080}],"selector":{"app":"web"}}}`
	const ym = "apiVersion: isthmus.io/v1alpha1\nkind: Service\nmetadata: {name: web, labels: {a: \"1\"}}\n" +
		"spec:\n  type: LoadBalancer\n  vips: [10.96.0.10]\n  ports: [{port: 80, targetPort: 8080}]\n  selector: {app: web}\n"
	if _, ok := jsonToGeneric([]byte(js)); !ok {
		t.Fatal("the fast path did not take a plain JSON object")
	}
	a, err := Decode([]byte(js))
	if err != nil {
		t.Fatal(err)
	}
	b, err := Decode([]byte(ym))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(a, b) {
		t.Fatalf("JSON and YAML of one service differ:\n%#v\n%#v", a[0], b[0])
	}
	for name, in := range map[string]string{
		"duplicate key":   `{"apiVersion":"isthmus.io/v1alpha1","kind":"Service","kind":"Service"}`,
		"trailing object": js + `{}`,
		"wrong number":    `{"apiVersion":"isthmus.io/v1alpha1","kind":"Service","metadata":{"name":"x"},"spec":{"vips":["10.96.0.1"],"ports":[{"port":1e999}]}}`,
	} {
		if _, ok := jsonToGeneric([]byte(in)); ok && name != "wrong number" {
			t.Errorf("%s: the fast path took %s", name, in)
		}
		if _, err := Decode([]byte(in)); err == nil && name != "trailing object" { // the YAML path reads one document
			t.Errorf("%s: Decode accepted %s", name, in)
		}
	}
}

// decodeSeeds are documents of every kind, in YAML, in their stored
// (canonical JSON) form and in JSON forms the fast paths must not take as
// they are.
func decodeSeeds(t testing.TB) [][]byte {
	yamls := []string{webService, denyPolicy, bgpPolicyYAML, l2Policy,
		pool("  blocks:\n  - cidr: 192.0.2.0/28\n  - start: 2001:db8::10\n    stop: 2001:db8::1f\n  serviceSelector:\n    matchLabels: {tier: web}\n  disabled: true\n") + "status: {used: 3, total: \"99\"}\n",
		benchServiceYAML(7),
		"apiVersion: isthmus.io/v1alpha1\nkind: Service\nmetadata: {name: s, namespace: prod, labels: {a: b}, annotations: {x/y: z}}\n" +
			"spec: {type: LoadBalancer, vips: [10.0.0.1, \"fd00::1\"], ports: [{name: p, port: 80, protocol: udp, nodePort: 30001}], backends: [{ip: 10.1.0.1}], " +
			"loadBalancerIPs: [192.0.2.1], externalIPs: [192.0.2.9], externalTrafficPolicy: Local}\nstatus: {loadBalancer: {ingress: [{ip: 192.0.2.1, pool: p}]}}\n",
	}
	var out [][]byte
	for _, y := range yamls {
		out = append(out, []byte(y))
		objs, err := Decode([]byte(y))
		if err != nil {
			t.Fatalf("seed does not decode: %v\n%s", err, y)
		}
		js, err := json.Marshal(objs[0])
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, js,
			bytes.Replace(js, []byte(`"metadata"`), []byte(`"Metadata"`), 1),          // case
			bytes.Replace(js, []byte(`"spec":{`), []byte(`"spec":{"x":1,`), 1),        // unknown field
			bytes.Replace(js, []byte(`{"name":`), []byte(`{"name":"dup","name":`), 1), // duplicate
			bytes.Replace(js, []byte(`"port":80`), []byte(`"port":"80"`), 1),          // number as string
			append(bytes.Clone(js), "\n "...),
		)
	}
	return out
}

func jsonToGenericTakes(doc []byte) bool {
	_, ok := jsonToGeneric(doc)
	return ok
}

// The fast paths of Decode give what the generic path gives:
// genericOfYAML what sigs.k8s.io/yaml's conversion through JSON text
// gives;
// decodeCanonical, for the documents it takes, what decoding the generic
// value gives; assignGeneric, where it takes a generic value, what
// decoding its JSON text with encoding/json gives (decodeGeneric, the way
// every document went before).
func FuzzDecodeFastPathsMatchGeneric(f *testing.F) {
	for _, s := range decodeSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, doc []byte) {
		raw, err := yamlToGeneric(doc)
		if viaJSON, errJSON := yamlToGenericViaJSON(doc); jsonToGenericTakes(doc) {
			// decided by jsonToGeneric, tested by TestDecodeJSONFastPath
		} else if (err == nil) != (errJSON == nil) || err != nil && err.Error() != errJSON.Error() || !reflect.DeepEqual(raw, viaJSON) {
			t.Fatalf("yamlToGeneric gave %#v, %v; through JSON text %#v, %v: %q", raw, err, viaJSON, errJSON, doc)
		}
		if err != nil {
			if _, ok := decodeCanonical(doc); ok {
				t.Fatalf("decodeCanonical took what the generic path refuses: %s", doc)
			}
			return
		}
		for _, kind := range []string{KindService, KindNetworkPolicy, KindLoadBalancerIPPool, KindBGPPeeringPolicy, KindL2AnnouncementPolicy} {
			fast := newObject(kind)
			if !assignGeneric(raw, reflect.ValueOf(fast).Elem()) {
				continue
			}
			ref := newObject(kind)
			if err := decodeGeneric(raw, ref); err != nil {
				t.Fatalf("assignGeneric took a %s that decodeGeneric refuses (%v): %s", kind, err, doc)
			}
			if !reflect.DeepEqual(fast, ref) {
				t.Fatalf("%s: assignGeneric gave\n%#v\ndecodeGeneric\n%#v", kind, fast, ref)
			}
		}
		o, ok := decodeCanonical(doc)
		if !ok {
			return
		}
		ref, err := decodeObject(raw)
		if err != nil {
			t.Fatalf("decodeCanonical took what decodeObject refuses (%v): %s", err, doc)
		}
		if !reflect.DeepEqual(o, ref) {
			t.Fatalf("decodeCanonical gave\n%#v\ndecodeObject\n%#v", o, ref)
		}
	})
}

// Stored objects take the canonical path: a bulk apply's services are
// decoded there by every agent and the server.
func TestDecodeCanonicalTakesStoredObjects(t *testing.T) {
	for i, s := range decodeSeeds(t) {
		if i%7 != 1 { // the stored form of each YAML seed
			continue
		}
		if _, ok := decodeCanonical(s); !ok {
			t.Errorf("the canonical path did not take %s", s)
		}
	}
}

// parseSimpleYAML gives, for what it takes, what the YAML library's path
// gives.
func FuzzSimpleYAMLMatchesLibrary(f *testing.F) {
	for _, s := range decodeSeeds(f) {
		f.Add(s)
	}
	for _, s := range []string{
		"a: 1\nb:\n  - x\n  - {c: d, e: [f, 'g', \"h\"]}\n- z\n",
		"a:\n- 1\n- -2\n- 0x1F\n- 0o17\n- 1_000\n- 0b101\n- 1.5\n- .5\n- 1e3\n- 2001-12-14\n- 9223372036854775808\n- 18446744073709551616\n",
		"a: yes\nb: No\nc: ~\nd: null\ne:\nf: on # comment\ng: .inf\nh: 10.98.0.1\ni: fd00::1\nj: http://x/y\n",
		"a: b\n  c\n", "a: b\n  # c\nd: e\n", "a: 'it''s'\n", "a: \"x\\ty\"\n", "a: b: c\n", "a: [b, c,]\n", "a: {b: c, b: d}\n",
		"a: 1\na: 2\n", "- a: 1\n  b: 2\n- c\n", "yes: 1\n", "<<: {a: 1}\n", "a: [fd00::1]\n", "a: &x 1\nb: *x\n",
		"  a: 1\nb: 2\n", "a:\n  b: 1\n c: 2\n", "a: x#y\n", "a: 'x'#y\n", "a: -\n", "a: - b\n", "a:    \n  - b\n",
		"a: {}\nb: []\nc: [ ]\nd: {b: [], c: {}}\n", "key with spaces: value with  spaces   # c\n", "a:b: c\n",
		strings.Repeat("+", 1100) + "a: -A", // a key too long to be one
		"... 0:",                            // a document marker
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, doc []byte) {
		v, ok := parseSimpleYAML(doc)
		if !ok {
			return
		}
		ref, err := yamlToGenericViaLibrary(doc)
		if err != nil {
			t.Fatalf("parseSimpleYAML took what the library refuses (%v): %q", err, doc)
		}
		if !reflect.DeepEqual(v, ref) {
			t.Fatalf("parseSimpleYAML gave %#v, the library %#v: %q", v, ref, doc)
		}
	})
}
