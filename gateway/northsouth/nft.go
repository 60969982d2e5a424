package northsouth

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"

	"golang.org/x/sys/unix"

	"github.com/isthmus-mesh/isthmus/bpf"
	"github.com/isthmus-mesh/isthmus/clustermesh/objects"
)

const chainName = "postrouting"

// TableName is the node's nftables table (family inet).
func TableName(node string) string { return "isthmus-" + node }

func table(node string) *nftables.Table {
	return &nftables.Table{Family: nftables.TableFamilyINet, Name: TableName(node)}
}

// The source ports the masquerade picks: above the node-port range, so a
// reply of a masqueraded flow (to the node's address and such a port) is
// never taken for a new flow to a node port by from_external, which sees
// it before the kernel undoes the SNAT.
const (
	masqPortMin = objects.NodePortMax + 1
	masqPortMax = 65535
)

// masqProtos are the protocols of the flows from_external marks (a
// frontend is TCP or UDP): the port range needs the protocol known.
var masqProtos = []byte{unix.IPPROTO_TCP, unix.IPPROTO_UDP}

// masqRule matches packets of protocol proto whose mark carries
// bpf.SNATMark and masquerades them to a source port in
// masqPortMin-masqPortMax.
func masqRule(t *nftables.Table, c *nftables.Chain, proto byte) *nftables.Rule {
	return &nftables.Rule{Table: t, Chain: c, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(bpf.SNATMarkMask), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(bpf.SNATMark)},
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
		&expr.Immediate{Register: 1, Data: binaryutil.BigEndian.PutUint16(masqPortMin)},
		&expr.Immediate{Register: 2, Data: binaryutil.BigEndian.PutUint16(masqPortMax)},
		&expr.Masq{ToPorts: true, RegProtoMin: 1, RegProtoMax: 2},
	}}
}

// tablePresent reports whether the node's table holds exactly the chain
// and rule EnsureTable makes.
func tablePresent(c *nftables.Conn, node string) (bool, error) {
	t, err := c.ListTableOfFamily(TableName(node), nftables.TableFamilyINet)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return false, nil
		}
		return false, fmt.Errorf("list nftables table %s: %w", TableName(node), err)
	}
	chains, err := c.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return false, fmt.Errorf("list nftables chains: %w", err)
	}
	for _, ch := range chains {
		if ch.Table.Name != t.Name || ch.Name != chainName {
			continue
		}
		if ch.Type != nftables.ChainTypeNAT || ch.Hooknum == nil || *ch.Hooknum != *nftables.ChainHookPostrouting {
			return false, nil
		}
		rules, err := c.GetRules(t, ch)
		if err != nil {
			return false, fmt.Errorf("list nftables rules of %s: %w", TableName(node), err)
		}
		if len(rules) != len(masqProtos) {
			return false, nil
		}
		for i, r := range rules {
			if !isMasq(r, masqProtos[i]) {
				return false, nil
			}
		}
		return true, nil
	}
	return false, nil
}

// isMasq recognises masqRule(proto) as the kernel gives it back.
func isMasq(r *nftables.Rule, proto byte) bool {
	var mark, l4, ports bool
	for _, e := range r.Exprs {
		switch e := e.(type) {
		case *expr.Cmp:
			want := make([]byte, 4)
			binary.NativeEndian.PutUint32(want, bpf.SNATMark)
			mark = mark || bytes.Equal(e.Data, want)
			l4 = l4 || bytes.Equal(e.Data, []byte{proto})
		case *expr.Immediate:
			ports = ports || bytes.Equal(e.Data, binaryutil.BigEndian.PutUint16(masqPortMin))
		case *expr.Masq:
			ports = ports && e.ToPorts
		}
	}
	return mark && l4 && ports
}

// EnsureTable makes the node's table hold the masquerade of marked packets
// (TCP and UDP, to source ports above the node-port range),
// replacing whatever else it holds, in one transaction (the table is
// never missing in between). It returns whether it changed anything.
func EnsureTable(node string) (bool, error) {
	c, err := nftables.New()
	if err != nil {
		return false, fmt.Errorf("nftables: %w", err)
	}
	ok, err := tablePresent(c, node)
	if err != nil || ok {
		return false, err
	}
	t := table(node)
	c.AddTable(t) // so that the delete below never fails
	c.DelTable(t)
	t = c.AddTable(table(node))
	ch := c.AddChain(&nftables.Chain{Name: chainName, Table: t, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
	for _, p := range masqProtos {
		c.AddRule(masqRule(t, ch, p))
	}
	if err := c.Flush(); err != nil {
		return false, fmt.Errorf("nftables: write table %s: %w", TableName(node), err)
	}
	return true, nil
}

// TablePresent reports whether the node's table holds exactly the
// masquerade EnsureTable makes.
func TablePresent(node string) (bool, error) {
	c, err := nftables.New()
	if err != nil {
		return false, fmt.Errorf("nftables: %w", err)
	}
	return tablePresent(c, node)
}

// RemoveTable removes the node's table; a missing table is not an error.
func RemoveTable(node string) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	if _, err := c.ListTableOfFamily(TableName(node), nftables.TableFamilyINet); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("list nftables table %s: %w", TableName(node), err)
	}
	c.DelTable(table(node))
	if err := c.Flush(); err != nil {
		return fmt.Errorf("nftables: remove table %s: %w", TableName(node), err)
	}
	return nil
}
