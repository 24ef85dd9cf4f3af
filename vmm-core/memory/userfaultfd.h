#pragma once
// Opening a userfaultfd that also catches faults the kernel takes on the process's behalf
// (KVM reading guest memory, vhost-vsock's worker). The userfaultfd() syscall allows that
// only with CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1, which a jailed core has not;
// /dev/userfaultfd (Linux 6.1+) allows it to whoever may open the device node, which the
// jailer grants the core of a fork (docs/JAILER.md).

#include "common/unique_fd.h"

namespace clonevm::vmm {

// The syscall first, then /dev/userfaultfd (USERFAULTFD_IOC_NEW). Non-blocking, close-on-exec.
// Throws clonevm::Error naming both attempts when neither works.
UniqueFd openUserfaultfd();

}  // namespace clonevm::vmm
