#include "common/unique_fd.h"

#include <unistd.h>

namespace clonevm {

void UniqueFd::reset(int fd) {
  if (fd_ >= 0) {
    ::close(fd_);  // close() errors on a fd we own cannot be acted on.
  }
  fd_ = fd;
}

}  // namespace clonevm
