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

size_t KvmSystem::xsaveSize() const {
  int size = checkExtension(KVM_CAP_XSAVE2);
  return std::max<size_t>(sizeof(kvm_xsave), size > 0 ? static_cast<size_t>(size) : 0);
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

kvm_irqchip KvmVm::getIrqchip(uint32_t chip) const {
  kvm_irqchip irqchip{};
  irqchip.chip_id = chip;
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_GET_IRQCHIP, &irqchip), "KVM_GET_IRQCHIP");
  return irqchip;
}

void KvmVm::setIrqchip(const kvm_irqchip& irqchip) {
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_SET_IRQCHIP, &irqchip), "KVM_SET_IRQCHIP");
}

kvm_pit_state2 KvmVm::getPit() const {
  kvm_pit_state2 pit{};
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_GET_PIT2, &pit), "KVM_GET_PIT2");
  return pit;
}

void KvmVm::setPit(const kvm_pit_state2& pit) {
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_SET_PIT2, &pit), "KVM_SET_PIT2");
}

kvm_clock_data KvmVm::getClock() const {
  kvm_clock_data clock{};
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_GET_CLOCK, &clock), "KVM_GET_CLOCK");
  return clock;
}

void KvmVm::setClock(const kvm_clock_data& clock) {
  kvm_clock_data value{};
  value.clock = clock.clock;  // flags 0: no realtime/host_tsc adjustment
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_SET_CLOCK, &value), "KVM_SET_CLOCK");
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

kvm_fpu KvmVcpu::getFpu() const {
  kvm_fpu fpu{};
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_GET_FPU, &fpu), "KVM_GET_FPU");
  return fpu;
}

std::vector<uint32_t> KvmVcpu::getXsave(size_t bytes) const {
  bytes = std::max(bytes, sizeof(kvm_xsave));
  std::vector<uint32_t> area((bytes + 3) / 4);
  unsigned long request = bytes > sizeof(kvm_xsave) ? KVM_GET_XSAVE2 : KVM_GET_XSAVE;
  CLONE_SYSCALL(::ioctl(fd_.get(), request, area.data()),
                bytes > sizeof(kvm_xsave) ? "KVM_GET_XSAVE2" : "KVM_GET_XSAVE");
  return area;
}

void KvmVcpu::setXsave(std::span<const uint32_t> area) {
  require(area.size() * 4 >= sizeof(kvm_xsave), "XSAVE area of {} bytes is too small",
          area.size() * 4);
  // KVM_SET_XSAVE reads as many bytes as the XSAVE2 size; the buffer is copied so that a
  // short (older-kernel) area is padded.
  std::vector<uint32_t> copy(area.begin(), area.end());
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_SET_XSAVE, copy.data()), "KVM_SET_XSAVE");
}

kvm_xcrs KvmVcpu::getXcrs() const {
  kvm_xcrs xcrs{};
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_GET_XCRS, &xcrs), "KVM_GET_XCRS");
  return xcrs;
}

void KvmVcpu::setXcrs(const kvm_xcrs& xcrs) {
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_SET_XCRS, &xcrs), "KVM_SET_XCRS");
}

size_t KvmVcpu::getMsrs(std::vector<kvm_msr_entry>& entries) const {
  FlexibleArray<kvm_msrs, kvm_msr_entry> msrs(entries.size());
  msrs.get()->nmsrs = static_cast<uint32_t>(entries.size());
  std::copy(entries.begin(), entries.end(), msrs.get()->entries);
  int got = CLONE_SYSCALL(::ioctl(fd_.get(), KVM_GET_MSRS, msrs.get()), "KVM_GET_MSRS");
  std::copy(msrs.get()->entries, msrs.get()->entries + entries.size(), entries.begin());
  return static_cast<size_t>(got);
}

size_t KvmVcpu::trySetMsrs(std::span<const kvm_msr_entry> entries) {
  FlexibleArray<kvm_msrs, kvm_msr_entry> msrs(entries.size());
  msrs.get()->nmsrs = static_cast<uint32_t>(entries.size());
  std::copy(entries.begin(), entries.end(), msrs.get()->entries);
  return static_cast<size_t>(
      CLONE_SYSCALL(::ioctl(fd_.get(), KVM_SET_MSRS, msrs.get()), "KVM_SET_MSRS"));
}

kvm_vcpu_events KvmVcpu::getEvents() const {
  kvm_vcpu_events events{};
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_GET_VCPU_EVENTS, &events), "KVM_GET_VCPU_EVENTS");
  return events;
}

void KvmVcpu::setEvents(const kvm_vcpu_events& events) {
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_SET_VCPU_EVENTS, &events), "KVM_SET_VCPU_EVENTS");
}

kvm_mp_state KvmVcpu::getMpState() const {
  kvm_mp_state state{};
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_GET_MP_STATE, &state), "KVM_GET_MP_STATE");
  return state;
}

void KvmVcpu::setMpState(const kvm_mp_state& state) {
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_SET_MP_STATE, &state), "KVM_SET_MP_STATE");
}

kvm_debugregs KvmVcpu::getDebugRegs() const {
  kvm_debugregs regs{};
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_GET_DEBUGREGS, &regs), "KVM_GET_DEBUGREGS");
  return regs;
}

void KvmVcpu::setDebugRegs(const kvm_debugregs& regs) {
  CLONE_SYSCALL(::ioctl(fd_.get(), KVM_SET_DEBUGREGS, &regs), "KVM_SET_DEBUGREGS");
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
