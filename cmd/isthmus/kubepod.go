package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Hidden commands that run inside the pods of the Kubernetes lab
// (lab/kube builds its images from the static isthmus binary).

// connectivityPauseCommand is every pod's sandbox process (containerd's
// sandbox_image): it holds the pod's namespaces until SIGTERM or SIGINT
// and, as PID 1 of the pod, reaps orphaned children.
func (c *cli) connectivityPauseCommand() *cobra.Command {
	return &cobra.Command{
		Use:    "pause",
		Short:  "Block until SIGTERM/SIGINT, reaping children (a pod's sandbox process)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ch := make(chan os.Signal, 4)
			signal.Notify(ch, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
			for sig := range ch {
				if sig != syscall.SIGCHLD {
					return nil
				}
				for {
					var ws syscall.WaitStatus
					pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
					if pid <= 0 || err != nil {
						break
					}
				}
			}
			return nil
		},
	}
}

// connectivityKubeAPICommand proves that a pod reaches the API server
// through the "kubernetes" Service with its service account.
func (c *cli) connectivityKubeAPICommand() *cobra.Command {
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:    "kube-api",
		Short:  "From inside a pod: get the API server's version and list namespaces (in-cluster config)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := rest.InClusterConfig()
			if err != nil {
				return fmt.Errorf("in-cluster config: %w", err)
			}
			cfg.Timeout = timeout
			cs, err := kubernetes.NewForConfig(cfg)
			if err != nil {
				return err
			}
			v, err := cs.Discovery().ServerVersion()
			if err != nil {
				return fmt.Errorf("server version from %s: %w", cfg.Host, err)
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			nss, err := cs.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
			if err != nil {
				return fmt.Errorf("list namespaces at %s: %w", cfg.Host, err)
			}
			fmt.Fprintf(c.out, "server %s version %s\n", cfg.Host, v.GitVersion)
			for _, ns := range nss.Items {
				fmt.Fprintf(c.out, "namespace %s\n", ns.Name)
			}
			return nil
		},
	}
	cmd.Flags().DurationVar(&timeout, "timeout", 10*time.Second, "timeout of each request")
	return cmd
}
