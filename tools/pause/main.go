// pause: the sandbox ("pause") container of CRI pods in lazysnap's tests, which cannot pull
// registry.k8s.io/pause: it holds the pod's namespaces, reaps orphans and exits on SIGINT or
// SIGTERM. Built static (CGO_ENABLED=0) and packed as an image by tests/cri.rs.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var st syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &st, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
