// Package nlbatch sends several rtnetlink requests in one sendmsg and
// reads the answer of each.
//
// Why: most rtnetlink requests take the kernel's RTNL lock, one lock for
// every namespace of the host. When many pods are created at once (a
// Deployment scaled up; every node of a lab on one kernel), each request
// queues for that lock behind the container runtime's namespace
// creation and the other adds, and a pod's plumbing made of twenty
// requests queues twenty times. Requests sent together are taken one
// after the other in the sending thread, which usually keeps the lock
// between them: a pod's plumbing queues a few times instead.
package nlbatch

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// Timeout bounds every wait for the kernel's answer: rtnetlink answers
// in the sendmsg call itself, so only a lost message waits this long.
const Timeout = 30 * time.Second

// maxNotes bounds the multicast messages a Socket keeps for Wait.
const maxNotes = 256

// Socket is an rtnetlink socket in the namespace of the thread that
// opened it.
type Socket struct {
	fd    int
	pid   uint32
	notes []syscall.NetlinkMessage // multicast messages read while waiting for answers
}

// Open opens an rtnetlink socket in the calling thread's network
// namespace, subscribed to the multicast groups in groups (a bit mask of
// RTMGRP_*; 0 for none).
func Open(groups uint32) (*Socket, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("netlink socket: %w", err)
	}
	s := &Socket{fd: fd}
	fail := func(what string, err error) (*Socket, error) {
		unix.Close(fd)
		return nil, fmt.Errorf("netlink socket: %s: %w", what, err)
	}
	// Errors carry the kernel's message; an error echoes only the header
	// of the request, not the request.
	for _, opt := range []int{unix.NETLINK_EXT_ACK, unix.NETLINK_CAP_ACK} {
		if err := unix.SetsockoptInt(fd, unix.SOL_NETLINK, opt, 1); err != nil {
			return fail("set option", err)
		}
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: groups}); err != nil {
		return fail("bind", err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return fail("getsockname", err)
	}
	s.pid = sa.(*unix.SockaddrNetlink).Pid
	return s, nil
}

// Close closes the socket.
func (s *Socket) Close() error { return unix.Close(s.fd) }

// Request is one rtnetlink request of a batch.
type Request struct {
	What    string // what it does, for errors: "add route 10.0.0.1/32 dev isth…"
	Msg     *nl.NetlinkRequest
	Replies []syscall.NetlinkMessage // what the kernel sent back before its ack (NLM_F_ECHO)
	Err     error                    // the kernel's answer; nil on success
}

// New is a request of type typ with flags (NLM_F_REQUEST and NLM_F_ACK
// are added) and data.
func New(what string, typ, flags int, data ...nl.NetlinkRequestData) *Request {
	m := nl.NewNetlinkRequest(typ, flags|unix.NLM_F_ACK)
	for _, d := range data {
		m.AddData(d)
	}
	return &Request{What: what, Msg: m}
}

// Do sends reqs in one sendmsg, in order, and waits for the answer of
// each; the kernel goes on with the next request when one fails. It
// returns the first failure in order (the rest are in each Request's
// Err), or an error of the socket.
func (s *Socket) Do(reqs ...*Request) error {
	if len(reqs) == 0 {
		return nil
	}
	var buf []byte
	pending := make(map[uint32]*Request, len(reqs))
	for _, r := range reqs {
		r.Replies, r.Err = nil, nil
		b := r.Msg.Serialize()
		for len(b)%unix.NLMSG_ALIGNTO != 0 {
			b = append(b, 0)
		}
		buf = append(buf, b...)
		pending[r.Msg.Seq] = r
	}
	if err := unix.Sendto(s.fd, buf, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return fmt.Errorf("send %d netlink requests (%s, …): %w", len(reqs), reqs[0].What, err)
	}
	for len(pending) > 0 {
		msgs, err := s.read()
		if err != nil {
			return fmt.Errorf("read the answers to %d netlink requests (%s, …): %w", len(reqs), reqs[0].What, err)
		}
		for _, m := range msgs {
			r, ok := pending[m.Header.Seq]
			if !ok || m.Header.Pid != s.pid {
				if m.Header.Seq == 0 && len(s.notes) < maxNotes {
					s.notes = append(s.notes, m)
				}
				continue // an answer to an earlier request that gave up
			}
			if m.Header.Type != unix.NLMSG_ERROR {
				r.Replies = append(r.Replies, m)
				continue
			}
			if errno, msg := parseAck(m); errno != 0 {
				err := error(errno)
				if msg != "" {
					err = fmt.Errorf("%w (%s)", errno, msg)
				}
				r.Err = fmt.Errorf("%s: %w", r.What, err)
			}
			delete(pending, m.Header.Seq)
		}
	}
	for _, r := range reqs {
		if r.Err != nil {
			return r.Err
		}
	}
	return nil
}

// Wait returns the first multicast message (of the groups Open
// subscribed to) for which match is true, reading up to timeout for it.
// Messages that do not match are dropped.
func (s *Socket) Wait(timeout time.Duration, match func(syscall.NetlinkMessage) bool) (syscall.NetlinkMessage, error) {
	deadline := time.Now().Add(timeout)
	for {
		for i, m := range s.notes {
			if match(m) {
				s.notes = s.notes[i+1:]
				return m, nil
			}
		}
		s.notes = s.notes[:0]
		left := time.Until(deadline)
		if left <= 0 {
			return syscall.NetlinkMessage{}, os.ErrDeadlineExceeded
		}
		msgs, err := s.readWithin(left)
		if err != nil {
			return syscall.NetlinkMessage{}, err
		}
		for _, m := range msgs {
			if m.Header.Seq == 0 && len(s.notes) < maxNotes {
				s.notes = append(s.notes, m)
			}
		}
	}
}

func (s *Socket) read() ([]syscall.NetlinkMessage, error) { return s.readWithin(Timeout) }

// readWithin reads the next datagram, waiting up to d for it.
func (s *Socket) readWithin(d time.Duration) ([]syscall.NetlinkMessage, error) {
	tv := unix.NsecToTimeval(max(d, time.Millisecond).Nanoseconds())
	if err := unix.SetsockoptTimeval(s.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return nil, fmt.Errorf("set receive timeout: %w", err)
	}
	buf := make([]byte, 64<<10)
	for {
		n, _, err := unix.Recvfrom(s.fd, buf, 0)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if errors.Is(err, unix.EAGAIN) {
			if d < Timeout {
				return nil, os.ErrDeadlineExceeded
			}
			return nil, fmt.Errorf("no answer from the kernel within %s", d)
		}
		if err != nil {
			return nil, err
		}
		return syscall.ParseNetlinkMessage(buf[:n])
	}
}

// parseAck returns the errno of an NLMSG_ERROR message (0: success) and
// the kernel's extended-ack message, if any.
func parseAck(m syscall.NetlinkMessage) (unix.Errno, string) {
	if len(m.Data) < 4 {
		return unix.EBADMSG, "short netlink error message"
	}
	code := int32(binary.NativeEndian.Uint32(m.Data[:4]))
	if code == 0 {
		return 0, ""
	}
	errno := unix.Errno(-code)
	// With NETLINK_CAP_ACK the request's header follows, then the
	// extended-ack attributes when NLM_F_ACK_TLVS is set.
	if m.Header.Flags&unix.NLM_F_ACK_TLVS == 0 || len(m.Data) < 4+unix.SizeofNlMsghdr {
		return errno, ""
	}
	attrs, err := nl.ParseRouteAttr(m.Data[4+unix.SizeofNlMsghdr:])
	if err != nil {
		return errno, ""
	}
	for _, a := range attrs {
		if a.Attr.Type == unix.NLMSGERR_ATTR_MSG {
			msg := a.Value
			for len(msg) > 0 && msg[len(msg)-1] == 0 {
				msg = msg[:len(msg)-1]
			}
			return errno, string(msg)
		}
	}
	return errno, ""
}
