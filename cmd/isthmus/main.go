// Command isthmus is the Isthmus command line: it talks to the node agent
// (isthmus-agent) over its local API socket.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"strings"
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
	// In cluster mode the agent answers 503 when it cannot reach the
	// cluster's etcd; the agent cannot tell whether the server is down or
	// only this node is cut off, so point at both views.
	if msg := err.Error(); api.StatusOf(err) == http.StatusServiceUnavailable && strings.Contains(msg, "kvstore") {
		return msg + " (isthmus status shows this node's connection to the cluster's etcd; isthmus clustermesh status, on the server host, shows the server)"
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
		Long: `isthmus controls the Isthmus agent of a node over its local API socket
(--socket): plumb pods (endpoint), apply, get and delete Services and
NetworkPolicies, and inspect identities, WireGuard and the datapath (status).
The clustermesh verbs talk to the cluster's etcd instead, the lab and
connectivity verbs build and check a demo mesh on this machine.

Read verbs take -o table (default), -o json or -o yaml. Shell completion:
isthmus completion bash|zsh|fish|powershell (see isthmus completion --help).`,
		Example: `  isthmus status
  isthmus endpoint add web1 --netns /var/run/netns/web1 --labels app=web
  isthmus apply -f web.yaml
  isthmus get services -o yaml
  source <(isthmus completion bash)`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(out)
	// Errors, not the whole usage, are printed (SilenceUsage): say where
	// the flags are listed.
	root.SetFlagErrorFunc(func(cmd *cobra.Command, err error) error {
		return fmt.Errorf("%w (isthmus %s--help lists the flags)", err, subPath(cmd))
	})
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
		c.bgpCommand(),
		c.l2Command(),
		c.metricsCommand(),
		c.labCommand(),
		c.connectivityCommand(),
		c.vmCommand(),
	)
	// Added here rather than by Execute, so that it is in the tree the
	// docs test walks and gets the unknown-subcommand check below.
	root.InitDefaultCompletionCmd()
	failUnknownSubcommands(root)
	return root
}

// subPath is the command's path without "isthmus", followed by a blank
// unless empty: "endpoint add ".
func subPath(cmd *cobra.Command) string {
	if !cmd.HasParent() {
		return ""
	}
	return strings.TrimPrefix(cmd.CommandPath(), cmd.Root().Name()+" ") + " "
}

// failUnknownSubcommands makes every command that only groups others print
// its help when called alone and fail on anything else: cobra would print
// the help and exit 0 for "isthmus endpoint typo".
func failUnknownSubcommands(cmd *cobra.Command) {
	for _, sub := range cmd.Commands() {
		failUnknownSubcommands(sub)
	}
	if !cmd.HasParent() || cmd.Runnable() || !cmd.HasSubCommands() {
		return
	}
	cmd.Args = cobra.ArbitraryArgs
	cmd.DisableFlagsInUseLine = true // alone it only prints help: no "[flags]" in that usage line
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if len(args) == 0 {
			return cmd.Help()
		}
		var names []string
		for _, sub := range cmd.Commands() {
			if sub.IsAvailableCommand() {
				names = append(names, sub.Name())
			}
		}
		msg := fmt.Sprintf("unknown command %q for %q: want %s", args[0], cmd.CommandPath(), strings.Join(names, ", "))
		if cmd.SuggestionsMinimumDistance <= 0 {
			cmd.SuggestionsMinimumDistance = 2 // cobra's default, set only for the root's own check
		}
		if s := cmd.SuggestionsFor(args[0]); len(s) > 0 {
			msg += " (did you mean " + strings.Join(s, " or ") + "?)"
		}
		return errors.New(msg)
	}
}

// withUsage wraps an argument check so that its error shows the usage
// line: "accepts 1 arg(s), received 0" alone does not say which argument.
func withUsage(check cobra.PositionalArgs) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if err := check(cmd, args); err != nil {
			return fmt.Errorf("%w; usage: %s", err, cmd.UseLine())
		}
		return nil
	}
}

// completionTimeout bounds the agent or etcd calls of shell completion: a
// slow answer is worse than none while the user waits at the prompt.
const completionTimeout = 3 * time.Second

// filterPrefix keeps the candidates that start with what is typed (the
// shells filter too, but this keeps `isthmus __complete` readable).
func filterPrefix(cands []cobra.Completion, toComplete string) []cobra.Completion {
	var out []cobra.Completion
	for _, c := range cands {
		if strings.HasPrefix(c, toComplete) {
			out = append(out, c)
		}
	}
	return out
}

// Output formats of read verbs.
const (
	formatTable = "table"
	formatJSON  = "json"
	formatYAML  = "yaml"
)

func addOutputFlag(cmd *cobra.Command, format *string) {
	cmd.Flags().StringVarP(format, "output", "o", formatTable, "output format: table, json or yaml")
	_ = cmd.RegisterFlagCompletionFunc("output", func(_ *cobra.Command, _ []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
		return filterPrefix([]cobra.Completion{formatTable, formatJSON, formatYAML}, toComplete), cobra.ShellCompDirectiveNoFileComp
	})
}

func checkFormat(format string) error {
	switch format {
	case formatTable, formatJSON, formatYAML:
		return nil
	}
	return fmt.Errorf("-o %q: want table, json or yaml", format)
}

// show runs a verb that fetches one value and prints it: it checks -o,
// calls fetch within the request timeout and prints the value as JSON or
// YAML, or with table for -o table.
func show[T any](c *cli, cmd *cobra.Command, format string, fetch func(context.Context) (T, error), table func(T) error) error {
	if err := checkFormat(format); err != nil {
		return err
	}
	ctx, cancel := c.ctx(cmd)
	defer cancel()
	v, err := fetch(ctx)
	if err != nil {
		return err
	}
	if format != formatTable {
		return printData(c.out, format, v)
	}
	return table(v)
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
