#pragma once
// The VM control API (ipc/capnp/vm_control.capnp) served on clone-vmm's --api-socket.

#include <string>

#include <spdlog/logger.h>

#include "vmm-core/vm/machine.h"
#include "vmm-core/vm/exit_signal.h"

namespace clonevm::vmm {

// Runs the API on `socketPath` and the VM until the VM ends; returns why it ended.
// The socket is removed on return.
ExitReason runWithApi(Machine& machine, const std::string& socketPath, spdlog::logger& log);

}  // namespace clonevm::vmm
