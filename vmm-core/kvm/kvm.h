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
  // Bytes of the vCPU XSAVE area (KVM_CAP_XSAVE2), at least sizeof(kvm_xsave).
  size_t xsaveSize() const;

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

  // Snapshot state of the in-kernel devices: chip is KVM_IRQCHIP_PIC_MASTER, _PIC_SLAVE or
  // _IOAPIC.
  kvm_irqchip getIrqchip(uint32_t chip) const;
  void setIrqchip(const kvm_irqchip& irqchip);
  kvm_pit_state2 getPit() const;
  void setPit(const kvm_pit_state2& pit);
  kvm_clock_data getClock() const;
  void setClock(const kvm_clock_data& clock);

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
  kvm_fpu getFpu() const;
  void setFpu(const kvm_fpu& fpu);
  // The XSAVE area as raw words, sized by KvmSystem::xsaveSize().
  std::vector<uint32_t> getXsave(size_t bytes) const;
  void setXsave(std::span<const uint32_t> area);
  kvm_xcrs getXcrs() const;
  void setXcrs(const kvm_xcrs& xcrs);
  // Reads the MSRs in `indices`; returns how many leading entries KVM filled.
  size_t getMsrs(std::vector<kvm_msr_entry>& entries) const;
  kvm_vcpu_events getEvents() const;
  void setEvents(const kvm_vcpu_events& events);
  kvm_mp_state getMpState() const;
  void setMpState(const kvm_mp_state& state);
  kvm_debugregs getDebugRegs() const;
  void setDebugRegs(const kvm_debugregs& regs);
  void setCpuid(const std::vector<kvm_cpuid_entry2>& entries);
  // Sets each (index, value) pair; throws unless KVM accepted all of them.
  void setMsrs(const std::vector<kvm_msr_entry>& entries);
  // Like setMsrs, but returns how many leading entries KVM accepted instead of throwing.
  size_t trySetMsrs(std::span<const kvm_msr_entry> entries);
  kvm_lapic_state getLapic() const;
  void setLapic(const kvm_lapic_state& lapic);

 private:
  uint32_t id_;
  UniqueFd fd_;
  kvm_run* run_ = nullptr;
  int runSize_ = 0;
};

}  // namespace clonevm::vmm
