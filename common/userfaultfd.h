#pragma once
// Opening a userfaultfd that also catches faults the kernel takes on the process's behalf
// (KVM reading guest memory, vhost-vsock's worker, io_uring copying a device's buffers). The
// userfaultfd() syscall allows that only with CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1,
// which a jailed process has not; /dev/userfaultfd (Linux 6.1+) allows it to whoever may open
// the device node, which the jailer grants a fork's core and disks (docs/JAILER.md).

#include "common/unique_fd.h"

namespace clonevm {

// The syscall first, then /dev/userfaultfd (USERFAULTFD_IOC_NEW). Non-blocking, close-on-exec.
// Throws clonevm::Error naming both attempts when neither works.
UniqueFd openUserfaultfd();

// /dev/userfaultfd itself, for a process that creates userfaultfds after its seccomp lockdown
// (which allows the ioctl but not open). Throws naming the path.
UniqueFd openUserfaultfdDevice();
// A new userfaultfd from that device, with the API handshake (UFFDIO_API) done.
UniqueFd newUserfaultfd(int device);

}  // namespace clonevm
