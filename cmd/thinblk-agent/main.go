// Command thinblk-agent runs inside test guests (started by the initramfs /init) and carries
// out the host's requests: run a command, write or read a file, power off. The protocol is
// guesttests/agentproto. It listens on AF_VSOCK when the guest has a vsock transport and serves
// the virtio-serial port named agentproto.SerialPortName when that exists; both may run at once.
package main

import (
	"context"
	"errors"
	"flag"
	"log/slog"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/thinblk/thinblk/guesttests/agentproto"
)

func main() {
	portName := flag.String("serial-port", agentproto.SerialPortName, "virtio-serial port name to serve")
	vsockPort := flag.Uint("vsock-port", agentproto.VsockPort, "AF_VSOCK port to listen on")
	noPowerOff := flag.Bool("no-power-off", false, "exit instead of powering off on request (for running outside a VM)")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil)).With("prog", "thinblk-agent")

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	powerOff := make(chan struct{}, 1)
	onServed := func(err error) {
		if errors.Is(err, agentproto.ErrPowerOff) {
			select {
			case powerOff <- struct{}{}:
			default:
			}
		}
	}

	started := 0
	if cid, ok := vsockUsable(localContextID); ok {
		l, err := listenVsock(uint32(*vsockPort))
		if err != nil {
			log.Warn("vsock listen failed, not using it", "cid", cid, "err", err)
		} else {
			log.Info("serving vsock", "cid", cid, "port", *vsockPort)
			go serveListener(ctx, l, handler{}, log, onServed)
			started++
		}
	} else {
		log.Info("no vsock transport in this guest")
	}
	if path, err := findSerialPort("/sys/class/virtio-ports", "/dev", *portName); err == nil {
		log.Info("serving virtio-serial", "port", path)
		go serveSerial(ctx, path, handler{}, log, onServed)
		started++
	} else {
		log.Info("no virtio-serial agent port", "err", err)
	}
	if started == 0 {
		log.Error("no transport to the host: neither vsock nor virtio-serial port " + *portName)
		os.Exit(1)
	}

	<-powerOff
	cancel()
	log.Info("powering off")
	unix.Sync()
	if *noPowerOff {
		return
	}
	// Let the acknowledgement leave the port before the machine stops.
	time.Sleep(100 * time.Millisecond)
	if err := unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF); err != nil {
		log.Error("power off", "err", err)
		os.Exit(1)
	}
}
