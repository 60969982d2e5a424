// Package mcs names the Kubernetes Multi-Cluster Services API kinds
// (KEP-1645, group multicluster.x-k8s.io) Isthmus reads and writes: a
// ServiceExport named like a Service makes it global in the mesh, and a
// ServiceImport tells every cluster about a service exported somewhere.
// Their CRDs are in k8s/crds for clusters that lack them.
package mcs

import "k8s.io/apimachinery/pkg/runtime/schema"

// GroupVersion of the kinds.
var GroupVersion = schema.GroupVersion{Group: "multicluster.x-k8s.io", Version: "v1alpha1"}

// Resources.
var (
	ServiceExports = GroupVersion.WithResource("serviceexports")
	ServiceImports = GroupVersion.WithResource("serviceimports")
)
