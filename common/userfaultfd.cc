#include "common/userfaultfd.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstring>

#include <fmt/format.h>

#include "common/error.h"

namespace clonevm {

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

UniqueFd openUserfaultfdDevice() {
  return UniqueFd(CLONE_SYSCALL(::open(kDevice, O_RDWR | O_CLOEXEC), "open", kDevice));
}

UniqueFd newUserfaultfd(int device) {
  UniqueFd fd(CLONE_SYSCALL(::ioctl(device, USERFAULTFD_IOC_NEW, kFlags),
                            "create a userfaultfd (USERFAULTFD_IOC_NEW)", kDevice));
  uffdio_api api{};
  api.api = UFFD_API;
  CLONE_SYSCALL(::ioctl(fd.get(), UFFDIO_API, &api), "UFFDIO_API", kDevice);
  return fd;
}

}  // namespace clonevm
