#include "vmm-core/memory/userfaultfd.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>

#include <fmt/format.h>

#include "common/error.h"

namespace clonevm::vmm {

namespace {
constexpr char kDevice[] = "/dev/userfaultfd";
constexpr int kFlags = O_CLOEXEC | O_NONBLOCK;
}  // namespace

UniqueFd openUserfaultfd() {
  int fd = static_cast<int>(::syscall(SYS_userfaultfd, kFlags));
  if (fd >= 0) return UniqueFd(fd);
  int syscallError = errno;
  UniqueFd device(::open(kDevice, O_RDWR | O_CLOEXEC));
  if (device) {
    fd = ::ioctl(device.get(), USERFAULTFD_IOC_NEW, kFlags);
    if (fd >= 0) return UniqueFd(fd);
  }
  throw Error(fmt::format(
      "userfaultfd: {} (faults from KVM need root, CAP_SYS_PTRACE or "
      "vm.unprivileged_userfaultfd=1); {}: {}",
      std::strerror(syscallError), kDevice, std::strerror(errno)));
}

}  // namespace clonevm::vmm
