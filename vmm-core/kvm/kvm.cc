#include "vmm-core/kvm/kvm.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include <algorithm>
#include <memory>

#include "common/error.h"

namespace clonevm::vmm {
namespace {

// A kvm_cpuid2 / kvm_msr_list style struct with a trailing array, sized at run time.
template <typename Header, typename Entry>
struct FlexibleArray {
  explicit FlexibleArray(size_t count)
      : storage(sizeof(Header) + count * sizeof(Entry)) {}
  Header* get() { return reinterpret_cast<Header*>(storage.data()); }
  std::vector<uint8_t> storage;
};

}  // namespace

KvmSystem::KvmSystem(const std::string& path)
    : fd_(CLONE_SYSCALL(::open(path.c_str(), O_RDWR | O_CLOEXEC), "open KVM device", path)) {
  int version = CLONE_SYSCALL(::ioctl(fd_.get(), KVM_GET_API_VERSION, 0), "KVM_GET_API_VERSION", path);
  require(version == KVM_API_VERSION, "{}: KVM API version {} (expected {})", path, version,
          KVM_API_VERSION);
}

int KvmSystem::checkExtension(long capability) const {
  return CLONE_SYSCALL(::ioctl(fd_.get(), KVM_CHECK_EXTENSION, capability), "KVM_CHECK_EXTENSION");
}

int KvmSystem::vcpuMmapSize() const {
  return CLONE_SYSCALL(::ioctl(fd_.get(), KVM_GET_VCPU_MMAP_SIZE, 0), "KVM_GET_VCPU_MMAP_SIZE");
}

int KvmSystem::maxVcpus() const {
  int max = checkExtension(KVM_CAP_MAX_VCPUS);
  return max > 0 ? max : checkExtension(KVM_CAP_NR_VCPUS);
}

std::vector<kvm_cpuid_entry2> KvmSystem::supportedCpuid() const {
  for (size_t count = 128;; count *= 2) {
    FlexibleArray<kvm_cpuid2, kvm_cpuid_entry2> cpuid(count);
    cpuid.get()->nent = static_cast<uint32_t>(count);
    if (::ioctl(fd_.get(), KVM_GET_SUPPORTED_CPUID, cpuid.get()) == 0) {
      auto* first = cpuid.get()->entries;
      return {first, first + cpuid.get()->nent};
    }
    if (errno != E2BIG || count > 4096) throwSystemError(errno, "KVM_GET_SUPPORTED_CPUID");
  }
}

std::vector<uint32_t> KvmSystem::msrIndexList() const {
  kvm_msr_list probe{};
  if (::ioctl(fd_.get(), KVM_GET_MSR_INDEX_LIST, &probe) < 0 && errno != E2BIG) {
    throwSystemError(errno, "KVM_GET_MSR_INDEX_LIST");
  }
  FlexibleArray<kvm_msr_list, uint32_t> list(probe.nmsrs);
  list.get()->nmsrs = probe.nmsrs;
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_GET_MSR_INDEX_LIST, list.get()), "KVM_GET_MSR_INDEX_LIST");
  auto* first = list.get()->indices;
  return {first, first + list.get()->nmsrs};
}

KvmVm::KvmVm(const KvmSystem& system)
    : system_(system),
      fd_(CLONE_SYSCALL(::ioctl(system.fd(), KVM_CREATE_VM, 0), "KVM_CREATE_VM")) {
  // Intel VMX needs these two pages for real-mode emulation; harmless on AMD. They sit in
  // the PCI hole below the IOAPIC, where no RAM or device lives.
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_SET_TSS_ADDR, 0xfffbd000UL), "KVM_SET_TSS_ADDR");
  uint64_t identityMap = 0xfffbc000;
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_SET_IDENTITY_MAP_ADDR, &identityMap),
                "KVM_SET_IDENTITY_MAP_ADDR");
}

void KvmVm::createIrqchipAndPit() {
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_CREATE_IRQCHIP, 0), "KVM_CREATE_IRQCHIP");
  kvm_pit_config pit{};
  pit.flags = KVM_PIT_SPEAKER_DUMMY;
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_CREATE_PIT2, &pit), "KVM_CREATE_PIT2");
}

void KvmVm::setUserMemoryRegion(uint32_t slot, uint64_t guestAddress, uint64_t size, void* host,
                                uint32_t flags) {
  kvm_userspace_memory_region region{};
  region.slot = slot;
  region.flags = flags;
  region.guest_phys_addr = guestAddress;
  region.memory_size = size;
  region.userspace_addr = reinterpret_cast<uint64_t>(host);
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_SET_USER_MEMORY_REGION, &region),
                "KVM_SET_USER_MEMORY_REGION");
}

void KvmVm::setIrqLine(uint32_t gsi, bool level) {
  kvm_irq_level irq{};
  irq.irq = gsi;
  irq.level = level ? 1 : 0;
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_IRQ_LINE, &irq), "KVM_IRQ_LINE");
}

void KvmVm::addIoeventfd(uint64_t address, uint32_t length, int eventfd, bool pio) {
  kvm_ioeventfd ioeventfd{};
  ioeventfd.addr = address;
  ioeventfd.len = length;
  ioeventfd.fd = eventfd;
  ioeventfd.flags = pio ? KVM_IOEVENTFD_FLAG_PIO : 0;
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_IOEVENTFD, &ioeventfd), "KVM_IOEVENTFD");
}

void KvmVm::removeIoeventfd(uint64_t address, uint32_t length, int eventfd, bool pio) {
  kvm_ioeventfd ioeventfd{};
  ioeventfd.addr = address;
  ioeventfd.len = length;
  ioeventfd.fd = eventfd;
  ioeventfd.flags = KVM_IOEVENTFD_FLAG_DEASSIGN | (pio ? KVM_IOEVENTFD_FLAG_PIO : 0);
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_IOEVENTFD, &ioeventfd), "KVM_IOEVENTFD deassign");
}

void KvmVm::addIrqfd(int eventfd, uint32_t gsi) {
  kvm_irqfd irqfd{};
  irqfd.fd = static_cast<uint32_t>(eventfd);
  irqfd.gsi = gsi;
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_IRQFD, &irqfd), "KVM_IRQFD");
}

void KvmVm::removeIrqfd(int eventfd, uint32_t gsi) {
  kvm_irqfd irqfd{};
  irqfd.fd = static_cast<uint32_t>(eventfd);
  irqfd.gsi = gsi;
  irqfd.flags = KVM_IRQFD_FLAG_DEASSIGN;
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_IRQFD, &irqfd), "KVM_IRQFD deassign");
}

void KvmVm::setGsiRouting(std::span<const kvm_irq_routing_entry> entries) {
  FlexibleArray<kvm_irq_routing, kvm_irq_routing_entry> routing(entries.size());
  routing.get()->nr = static_cast<uint32_t>(entries.size());
  routing.get()->flags = 0;
  std::copy(entries.begin(), entries.end(), routing.get()->entries);
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_SET_GSI_ROUTING, routing.get()), "KVM_SET_GSI_ROUTING");
}

KvmVcpu::KvmVcpu(const KvmVm& vm, uint32_t id)
    : id_(id),
      fd_(CLONE_SYSCALL(::ioctl(vm.fd(), KVM_CREATE_VCPU, static_cast<unsigned long>(id)),
                        "KVM_CREATE_VCPU")) {
  runSize_ = vm.system().vcpuMmapSize();
  void* run = ::mmap(nullptr, static_cast<size_t>(runSize_), PROT_READ | PROT_WRITE, MAP_SHARED,
                     fd_.get(), 0);
  if (run == MAP_FAILED) throwSystemError(errno, "mmap kvm_run");
  run_ = static_cast<kvm_run*>(run);
}

KvmVcpu::~KvmVcpu() {
  if (run_ != nullptr) ::munmap(run_, static_cast<size_t>(runSize_));
}

bool KvmVcpu::run() {
  if (::ioctl(fd_.get(), KVM_RUN, 0) == 0) return true;
  if (errno == EINTR || errno == EAGAIN) return false;
  throwSystemError(errno, "KVM_RUN");
}

kvm_regs KvmVcpu::getRegs() const {
  kvm_regs regs{};
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_GET_REGS, &regs), "KVM_GET_REGS");
  return regs;
}

void KvmVcpu::setRegs(const kvm_regs& regs) {
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_SET_REGS, &regs), "KVM_SET_REGS");
}

kvm_sregs KvmVcpu::getSregs() const {
  kvm_sregs sregs{};
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_GET_SREGS, &sregs), "KVM_GET_SREGS");
  return sregs;
}

void KvmVcpu::setSregs(const kvm_sregs& sregs) {
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_SET_SREGS, &sregs), "KVM_SET_SREGS");
}

void KvmVcpu::setFpu(const kvm_fpu& fpu) {
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_SET_FPU, &fpu), "KVM_SET_FPU");
}

void KvmVcpu::setCpuid(const std::vector<kvm_cpuid_entry2>& entries) {
  FlexibleArray<kvm_cpuid2, kvm_cpuid_entry2> cpuid(entries.size());
  cpuid.get()->nent = static_cast<uint32_t>(entries.size());
  std::copy(entries.begin(), entries.end(), cpuid.get()->entries);
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_SET_CPUID2, cpuid.get()), "KVM_SET_CPUID2");
}

void KvmVcpu::setMsrs(const std::vector<kvm_msr_entry>& entries) {
  FlexibleArray<kvm_msrs, kvm_msr_entry> msrs(entries.size());
  msrs.get()->nmsrs = static_cast<uint32_t>(entries.size());
  std::copy(entries.begin(), entries.end(), msrs.get()->entries);
  int set = CLONE_SYSCALL(::ioctl(fd_.get(), KVM_SET_MSRS, msrs.get()), "KVM_SET_MSRS");
  require(static_cast<size_t>(set) == entries.size(), "KVM_SET_MSRS: MSR {:#x} was refused",
          static_cast<size_t>(set) < entries.size() ? entries[static_cast<size_t>(set)].index : 0);
}

kvm_lapic_state KvmVcpu::getLapic() const {
  kvm_lapic_state lapic{};
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_GET_LAPIC, &lapic), "KVM_GET_LAPIC");
  return lapic;
}

void KvmVcpu::setLapic(const kvm_lapic_state& lapic) {
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_SET_LAPIC, &lapic), "KVM_SET_LAPIC");
}

}  // namespace clonevm::vmm
