// Command isthmus is the Isthmus command line: it talks to the node agent
// (isthmus-agent) over its local API socket.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"

	"github.com/isthmus-mesh/isthmus/agent/api"
)

// requestTimeout bounds one CLI call; the agent itself waits at most 30s for
// the datapath.
const requestTimeout = time.Minute

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCommand(os.Stdin, os.Stdout).ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "Error:", errorMessage(err))
		os.Exit(1)
	}
}

// errorMessage adds what to do next where the agent's message cannot know it.
func errorMessage(err error) string {
	var ue *api.UnreachableError
	if errors.As(err, &ue) {
		return err.Error() + " (--socket or ISTHMUS_SOCKET)"
	}
	return err.Error()
}

// cli holds what every command shares.
type cli struct {
	socket string
	in     io.Reader
	out    io.Writer
}

func (c *cli) client() *api.Client { return api.NewClient(c.socket) }

func (c *cli) ctx(cmd *cobra.Command) (context.Context, context.CancelFunc) {
	return context.WithTimeout(cmd.Context(), requestTimeout)
}

func newRootCommand(in io.Reader, out io.Writer) *cobra.Command {
	c := &cli{in: in, out: out}
	root := &cobra.Command{
		Use:   "isthmus",
		Short: "Control an Isthmus node",
		Long: `isthmus controls the Isthmus agent of a node over its local API socket:
plumb pods (endpoints), apply Services and NetworkPolicies, and inspect
identities and datapath status.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(out)
	defaultSocket := os.Getenv("ISTHMUS_SOCKET")
	if defaultSocket == "" {
		defaultSocket = api.DefaultSocketPath(api.DefaultNodeName())
	}
	root.PersistentFlags().StringVar(&c.socket, "socket", defaultSocket, "the agent's API socket (env ISTHMUS_SOCKET; default is the socket of the agent named after this host)")
	root.AddCommand(
		c.endpointCommand(),
		c.applyCommand(),
		c.getCommand(),
		c.deleteCommand(),
		c.identityCommand(),
		c.statusCommand(),
		c.clustermeshCommand(),
		c.wireguardCommand(),
		c.labCommand(),
		c.connectivityCommand(),
	)
	return root
}

// Output formats of read verbs.
const (
	formatTable = "table"
	formatJSON  = "json"
	formatYAML  = "yaml"
)

func addOutputFlag(cmd *cobra.Command, format *string) {
	cmd.Flags().StringVarP(format, "output", "o", formatTable, "output format: table, json or yaml")
}

func checkFormat(format string) error {
	switch format {
	case formatTable, formatJSON, formatYAML:
		return nil
	}
	return fmt.Errorf("-o %q: want table, json or yaml", format)
}

// printData writes v as JSON or YAML.
func printData(w io.Writer, format string, v any) error {
	var data []byte
	var err error
	if format == formatYAML {
		data, err = yaml.Marshal(v)
	} else {
		data, err = json.MarshalIndent(v, "", "  ")
		data = append(data, '\n')
	}
	if err != nil {
		return err
	}
	_, err = w.Write(data)
	return err
}

func newTable(w io.Writer) *tabwriter.Writer {
	return tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
}
