// Package kubeclient loads the client configuration of the Kubernetes API
// server for the agent and the clustermesh server alike.
package kubeclient

import (
	"fmt"
	"os"

	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// RESTConfig loads a kubeconfig file, or the in-cluster service account
// (the pod's token and CA, KUBERNETES_SERVICE_HOST/PORT) when path is "".
func RESTConfig(path string) (*rest.Config, error) {
	if path == "" {
		c, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("kubernetes: no --kubeconfig given and not running in a pod (%w)", err)
		}
		return c, nil
	}
	if _, err := os.Stat(path); err != nil {
		return nil, fmt.Errorf("kubernetes: kubeconfig: %w", err)
	}
	c, err := clientcmd.BuildConfigFromFlags("", path)
	if err != nil {
		return nil, fmt.Errorf("kubernetes: kubeconfig %s: %w", path, err)
	}
	return c, nil
}

// Served reports whether the API server serves resource gvr (a CRD may be
// installed after its reader started).
func Served(d discovery.DiscoveryInterface, gvr schema.GroupVersionResource) bool {
	res, err := d.ServerResourcesForGroupVersion(gvr.GroupVersion().String())
	if err != nil {
		return false
	}
	for _, r := range res.APIResources {
		if r.Name == gvr.Resource {
			return true
		}
	}
	return false
}
