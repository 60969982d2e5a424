package kvstore

import (
	"context"
	"fmt"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Permission grants a role access to every key under Prefix (or, when End
// is set, to the key range [Prefix, End)): read always, write too when
// Write is set. Ranges let a role cover a prefix except a hole, e.g. every
// key under isthmus/ but isthmus/remotes/: etcd permissions only add up.
type Permission struct {
	Prefix string
	End    string
	Write  bool
}

// EnsureRole creates role if needed and makes its permissions exactly
// perms: missing ones are granted, others revoked. Needs the root user.
func (c *Client) EnsureRole(ctx context.Context, role string, perms ...Permission) error {
	return c.do(ctx, opAuth, "role "+role, func(ctx context.Context) error {
		if _, err := c.cli.RoleAdd(ctx, role); err != nil && !isEtcdError(err, rpctypes.ErrRoleAlreadyExist) {
			return err
		}
		want := map[string]bool{}
		for _, p := range perms {
			if p.Prefix == "" {
				return fmt.Errorf("role %s: empty prefix would grant the whole keyspace", role)
			}
			end := clientv3.GetPrefixRangeEnd(p.Prefix)
			if p.End != "" {
				if p.End <= p.Prefix {
					return fmt.Errorf("role %s: empty range [%q, %q)", role, p.Prefix, p.End)
				}
				end = p.End
			}
			typ := clientv3.PermissionType(clientv3.PermRead)
			if p.Write {
				typ = clientv3.PermissionType(clientv3.PermReadWrite)
			}
			if _, err := c.cli.RoleGrantPermission(ctx, role, p.Prefix, end, typ); err != nil {
				return err
			}
			want[p.Prefix+"\x00"+end] = true
		}
		got, err := c.cli.RoleGet(ctx, role)
		if err != nil {
			return err
		}
		for _, p := range got.Perm {
			if want[string(p.Key)+"\x00"+string(p.RangeEnd)] {
				continue
			}
			if _, err := c.cli.RoleRevokePermission(ctx, role, string(p.Key), string(p.RangeEnd)); err != nil {
				return err
			}
		}
		return nil
	})
}

// EnsureUser creates user if needed and grants it roles. An empty password
// makes a user that can only log in with a client certificate whose common
// name is the user name. An existing user's password is left alone.
func (c *Client) EnsureUser(ctx context.Context, user, password string, roles ...string) error {
	return c.do(ctx, opAuth, "user "+user, func(ctx context.Context) error {
		_, err := c.cli.UserAddWithOptions(ctx, user, password, &clientv3.UserAddOptions{NoPassword: password == ""})
		if err != nil && !isEtcdError(err, rpctypes.ErrUserAlreadyExist) {
			return err
		}
		for _, r := range roles {
			if _, err := c.cli.UserGrantRole(ctx, user, r); err != nil {
				return fmt.Errorf("grant role %s: %w", r, err)
			}
		}
		return nil
	})
}

// DeleteUser removes user; a missing user is not an error.
func (c *Client) DeleteUser(ctx context.Context, user string) error {
	return c.do(ctx, opAuth, "delete user "+user, func(ctx context.Context) error {
		_, err := c.cli.UserDelete(ctx, user)
		if isEtcdError(err, rpctypes.ErrUserNotFound) {
			return nil
		}
		return err
	})
}

// DeleteRole deletes role; a missing role is not an error.
func (c *Client) DeleteRole(ctx context.Context, role string) error {
	return c.do(ctx, opAuth, "delete role "+role, func(ctx context.Context) error {
		_, err := c.cli.RoleDelete(ctx, role)
		if isEtcdError(err, rpctypes.ErrRoleNotFound) {
			return nil
		}
		return err
	})
}

// EnableAuth turns on etcd authentication (a no-op if it is on). The root
// user with the root role must exist.
func (c *Client) EnableAuth(ctx context.Context) error {
	return c.do(ctx, opAuth, "enable", func(ctx context.Context) error {
		st, err := c.cli.AuthStatus(ctx)
		if err != nil {
			return err
		}
		if st.Enabled {
			return nil
		}
		_, err = c.cli.AuthEnable(ctx)
		return err
	})
}
