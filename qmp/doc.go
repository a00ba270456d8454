// Package qmp serves the QEMU Machine Protocol, so that the clients that
// drive QEMU and qemu-storage-daemon (go-qemu's qmp package, qmp-shell,
// libvirt-style tools) drive thinblk's control socket too. It is generic:
// the protocol, the built-in commands qmp_capabilities, query-commands and
// query-version, and events; thinblk's own commands are registered on it.
//
// # Protocol
//
// A client connects and gets a greeting,
//
//	{"QMP": {"version": {"qemu": {"major": 1, "minor": 2, "micro": 3}, "package": "thinblk 1.2.3"}, "capabilities": []}}
//
// and is in capabilities negotiation mode: every command but
// qmp_capabilities fails with CommandNotFound, and no events are sent.
// After qmp_capabilities it is in command mode:
//
//	-> {"execute": "volume-create", "arguments": {"name": "vol0", "size": 1073741824}, "id": 1}
//	<- {"return": {}, "id": 1}
//	-> {"execute": "volume-create", "arguments": {"name": 7}, "id": 2}
//	<- {"error": {"class": "GenericError", "desc": "Invalid parameter type for 'name', expected: string"}, "id": 2}
//	<- {"event": "POOL_LOW_WATER", "data": {...}, "timestamp": {"seconds": 1764000000, "microseconds": 12345}}
//
// Input is a stream of JSON objects that need no separator (python's QMP
// clients send none); output is one ASCII JSON object per line, ended by
// CRLF. Errors in the envelope are worded as QEMU words them (a test
// compares them with qemu-storage-daemon's). No capability is offered, so
// out-of-band execution ("exec-oob") is refused, as QEMU refuses it to
// clients that did not enable it.
//
// # Hostile clients
//
// A message is capped (MaxMessageSize, 1 MiB by default, and MaxDepth
// levels of nesting): a longer one gets an error reply and is skipped
// while only its nesting depth is tracked, so memory stays bounded and the
// stream stays in sync. As in QEMU, a byte that cannot occur in JSON (a
// control character, 0xff) discards the partial message: that is how a
// client resynchronizes. A client that does not finish negotiation within
// HandshakeTimeout, or a message within MessageTimeout, is dropped; an idle
// client in command mode may stay as long as it likes. Each client has a
// bounded queue of outgoing messages (QueueLength messages, QueueBytes
// bytes): Emit never waits, and a client whose queue overflows with events
// is dropped with a log line, so a slow client cannot hold up events to
// the others. Replies wait for room in the queue
// (a client sending commands faster than it reads is slowed down), and a
// client that stops reading for WriteTimeout is dropped. At most
// MaxClients connections are served. A panicking handler gets a
// GenericError reply; the connection and the server stay up.
//
// # Use
//
//	srv := qmp.NewServer(qmp.Options{Logger: log, Version: version})
//	srv.Register("volume-create", func(ctx context.Context, raw json.RawMessage) (any, error) {
//		var args struct {
//			Name string `json:"name"`
//			Size uint64 `json:"size"`
//			Reserve bool `json:"reserve,omitempty"` // optional
//		}
//		if err := qmp.DecodeArgs(raw, &args); err != nil {
//			return nil, err // a GenericError naming the bad member
//		}
//		if exists(args.Name) {
//			return nil, qmp.Errorf("volume %s exists", args.Name)
//		}
//		return nil, create(ctx, args.Name, args.Size) // nil result: {}
//	})
//	ln, err := srv.ListenUnix("/run/thinblk/qmp.sock", 0o600)
//	...
//	go srv.Serve(ctx, ln)
//	srv.Emit("POOL_LOW_WATER", map[string]any{"pool": "p0", "free": free})
//	...
//	srv.Close() // cancels handlers' context, waits for them, removes the socket
//
// Commands of one connection run one after the other, in order; those of
// different connections run concurrently, so handlers must be safe for
// concurrent use. A handler must return once its context is cancelled:
// Close waits for it. Do not call Close from a handler (it would wait for
// itself); call it from another goroutine.
//
// The CLI side is Client: Dial, then Execute(ctx, command, args, &result);
// error replies come back as *Error, events on Events().
//
// go-qemu's SocketMonitor works against this server (tested); note that it
// reads lines with a bufio.Scanner, so it cannot take a reply larger than
// 64 KiB, and its response type wants string ids.
package qmp
