#pragma once
// What the core process of a `clone run` VM needs from its jail.

#include <string>
#include <vector>

#include "cli/process_launcher.h"
#include "cli/run_command.h"

namespace clonevm::cli {

// The ProcessSpec of clone-vmm (`program`) for `options`: its files (made absolute, since the
// jailed process starts in /), the vhost-user sockets and /dev/kvm. Its API socket
// (options.apiSocket) is `apiFd`, bound by the caller and inherited, so the jail holds no
// writable directory for it.
ProcessSpec vmmProcessSpec(const RunOptions& options, const std::vector<std::string>& globalArgs,
                           const std::string& program, int apiFd = -1);

}  // namespace clonevm::cli
