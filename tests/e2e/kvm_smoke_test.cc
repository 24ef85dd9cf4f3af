// The lab's first proof: real KVM runs guest code to an I/O exit and a HLT.
#include <fcntl.h>
#include "vmm-core/kvm/kvm_uapi.h"
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstring>

#include <gtest/gtest.h>

#include "common/error.h"
#include "common/unique_fd.h"

namespace clonevm {
namespace {

// Real mode: mov dx,0x3f8; mov al,2; add al,3; out dx,al; hlt
constexpr uint8_t kGuestCode[] = {0xba, 0xf8, 0x03, 0xb0, 0x02, 0x04, 0x03, 0xee, 0xf4};
constexpr uint64_t kGuestMemSize = 0x10000;
constexpr uint64_t kCodeAddr = 0x1000;

TEST(KvmSmokeTest, GuestCodeRunsToIoExitAndHlt) {
  UniqueFd kvm(::open("/dev/kvm", O_RDWR | O_CLOEXEC));
  ASSERT_TRUE(kvm.valid()) << "/dev/kvm: " << std::strerror(errno)
                           << " (run e2e tests through tests/lab/run on hosts without KVM)";
  ASSERT_EQ(::ioctl(kvm.get(), KVM_GET_API_VERSION, 0), KVM_API_VERSION);

  UniqueFd vm(CLONE_SYSCALL(::ioctl(kvm.get(), KVM_CREATE_VM, 0), "KVM_CREATE_VM"));
  void* mem = ::mmap(nullptr, kGuestMemSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS,
                     -1, 0);
  ASSERT_NE(mem, MAP_FAILED);
  std::memcpy(static_cast<uint8_t*>(mem) + kCodeAddr, kGuestCode, sizeof(kGuestCode));
  kvm_userspace_memory_region region{};
  region.slot = 0;
  region.guest_phys_addr = 0;
  region.memory_size = kGuestMemSize;
  region.userspace_addr = reinterpret_cast<uint64_t>(mem);
  CLONE_SYSCALL(::ioctl(vm.get(), KVM_SET_USER_MEMORY_REGION, &region), "KVM_SET_USER_MEMORY_REGION");

  UniqueFd vcpu(CLONE_SYSCALL(::ioctl(vm.get(), KVM_CREATE_VCPU, 0), "KVM_CREATE_VCPU"));
  int runSize = CLONE_SYSCALL(::ioctl(kvm.get(), KVM_GET_VCPU_MMAP_SIZE, 0), "KVM_GET_VCPU_MMAP_SIZE");
  auto* run = static_cast<kvm_run*>(
      ::mmap(nullptr, runSize, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu.get(), 0));
  ASSERT_NE(run, MAP_FAILED);

  kvm_sregs sregs{};
  CLONE_SYSCALL(::ioctl(vcpu.get(), KVM_GET_SREGS, &sregs), "KVM_GET_SREGS");
  sregs.cs.base = 0;
  sregs.cs.selector = 0;
  CLONE_SYSCALL(::ioctl(vcpu.get(), KVM_SET_SREGS, &sregs), "KVM_SET_SREGS");
  kvm_regs regs{};
  regs.rip = kCodeAddr;
  regs.rflags = 0x2;
  CLONE_SYSCALL(::ioctl(vcpu.get(), KVM_SET_REGS, &regs), "KVM_SET_REGS");

  CLONE_SYSCALL(::ioctl(vcpu.get(), KVM_RUN, 0), "KVM_RUN");
  ASSERT_EQ(run->exit_reason, KVM_EXIT_IO);
  EXPECT_EQ(run->io.direction, KVM_EXIT_IO_OUT);
  EXPECT_EQ(run->io.port, 0x3f8);
  EXPECT_EQ(run->io.size, 1);
  EXPECT_EQ(run->io.count, 1u);
  EXPECT_EQ(*(reinterpret_cast<uint8_t*>(run) + run->io.data_offset), 5);

  CLONE_SYSCALL(::ioctl(vcpu.get(), KVM_RUN, 0), "KVM_RUN");
  EXPECT_EQ(run->exit_reason, KVM_EXIT_HLT);
  CLONE_SYSCALL(::ioctl(vcpu.get(), KVM_GET_REGS, &regs), "KVM_GET_REGS");
  EXPECT_EQ(regs.rip, kCodeAddr + sizeof(kGuestCode));

  ::munmap(run, runSize);
  ::munmap(mem, kGuestMemSize);
}

}  // namespace
}  // namespace clonevm
