#pragma once
// Thin owners of the KVM file descriptors: the system (/dev/kvm), a VM and its vCPUs.
// Every ioctl failure throws clonevm::SystemError naming the ioctl.

#include "vmm-core/kvm/kvm_uapi.h"

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "common/unique_fd.h"

namespace clonevm::vmm {

class KvmSystem {
 public:
  // Opens `path` (normally /dev/kvm) and checks the API version.
  explicit KvmSystem(const std::string& path = "/dev/kvm");

  int fd() const { return fd_.get(); }
  int checkExtension(long capability) const;
  int vcpuMmapSize() const;
  int maxVcpus() const;
  std::vector<kvm_cpuid_entry2> supportedCpuid() const;
  std::vector<uint32_t> msrIndexList() const;

 private:
  UniqueFd fd_;
};

class KvmVcpu;

class KvmVm {
 public:
  explicit KvmVm(const KvmSystem& system);

  int fd() const { return fd_.get(); }
  const KvmSystem& system() const { return system_; }

  // The in-kernel PIC, IOAPIC and LAPICs, and the PIT; must precede vCPU creation.
  void createIrqchipAndPit();
  void setUserMemoryRegion(uint32_t slot, uint64_t guestAddress, uint64_t size, void* host,
                           uint32_t flags = 0);
  // Drives an in-kernel irqchip input (GSI) to `level`.
  void setIrqLine(uint32_t gsi, bool level);
  // Registers `eventfd` so a write to `address` (port or MMIO) signals it without an exit.
  void addIoeventfd(uint64_t address, uint32_t length, int eventfd, bool pio);
  // Undoes addIoeventfd with the same arguments.
  void removeIoeventfd(uint64_t address, uint32_t length, int eventfd, bool pio);
  // Registers `eventfd` so that signalling it injects GSI `gsi`.
  void addIrqfd(int eventfd, uint32_t gsi);
  // Undoes addIrqfd with the same arguments.
  void removeIrqfd(int eventfd, uint32_t gsi);
  // Replaces the whole GSI routing table (KVM_SET_GSI_ROUTING), the irqchip's default
  // routes included. Use GsiRouting (gsi_routing.h), which keeps the table, not this.
  void setGsiRouting(std::span<const kvm_irq_routing_entry> entries);

 private:
  const KvmSystem& system_;
  UniqueFd fd_;
};

class KvmVcpu {
 public:
  KvmVcpu(const KvmVm& vm, uint32_t id);
  KvmVcpu(const KvmVcpu&) = delete;
  KvmVcpu& operator=(const KvmVcpu&) = delete;
  ~KvmVcpu();

  uint32_t id() const { return id_; }
  int fd() const { return fd_.get(); }
  kvm_run* runState() const { return run_; }

  // Runs until the next exit to userspace. Returns false if interrupted by a signal (EINTR).
  bool run();

  kvm_regs getRegs() const;
  void setRegs(const kvm_regs& regs);
  kvm_sregs getSregs() const;
  void setSregs(const kvm_sregs& sregs);
  void setFpu(const kvm_fpu& fpu);
  void setCpuid(const std::vector<kvm_cpuid_entry2>& entries);
  // Sets each (index, value) pair; throws unless KVM accepted all of them.
  void setMsrs(const std::vector<kvm_msr_entry>& entries);
  kvm_lapic_state getLapic() const;
  void setLapic(const kvm_lapic_state& lapic);

 private:
  uint32_t id_;
  UniqueFd fd_;
  kvm_run* run_ = nullptr;
  int runSize_ = 0;
};

}  // namespace clonevm::vmm
