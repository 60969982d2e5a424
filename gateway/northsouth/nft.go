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

	"github.com/isthmus-mesh/isthmus/bpf"
)

const chainName = "postrouting"

// TableName is the node's nftables table (family inet).
func TableName(node string) string { return "isthmus-" + node }

func table(node string) *nftables.Table {
	return &nftables.Table{Family: nftables.TableFamilyINet, Name: TableName(node)}
}

// masqRule matches packets whose mark carries bpf.SNATMark and
// masquerades them.
func masqRule(t *nftables.Table, c *nftables.Chain) *nftables.Rule {
	return &nftables.Rule{Table: t, Chain: c, Exprs: []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(bpf.SNATMarkMask), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(bpf.SNATMark)},
		&expr.Masq{},
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
		return len(rules) == 1 && isMasq(rules[0]), nil
	}
	return false, nil
}

// isMasq recognises masqRule as the kernel gives it back.
func isMasq(r *nftables.Rule) bool {
	var cmp, masq bool
	for _, e := range r.Exprs {
		switch e := e.(type) {
		case *expr.Cmp:
			want := make([]byte, 4)
			binary.NativeEndian.PutUint32(want, bpf.SNATMark)
			cmp = bytes.Equal(e.Data, want)
		case *expr.Masq:
			masq = true
		}
	}
	return cmp && masq
}

// EnsureTable makes the node's table hold the masquerade of marked packets,
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
	c.AddRule(masqRule(t, ch))
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
