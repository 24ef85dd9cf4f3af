#include "cli/process_launcher.h"

#include <fcntl.h>

namespace clonevm::cli {

void prepareSpawn(const ProcessSpec& spec, posix_spawn_file_actions_t& actions,
                  posix_spawnattr_t& attributes) {
  // dup2 of an fd onto itself clears its close-on-exec flag (POSIX 2024, glibc >= 2.29).
  for (int fd : spec.keepFds) posix_spawn_file_actions_adddup2(&actions, fd, fd);
  if (spec.detachedOutput.empty()) return;
  posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, 1, spec.detachedOutput.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0600);
  posix_spawn_file_actions_adddup2(&actions, 1, 2);
  posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSID);
}

}  // namespace clonevm::cli
