#include "vmm-core/snapshot/machine_state.h"

#include <algorithm>

#include "common/error.h"
#include "vmm-core/snapshot/state_codec.h"

namespace clonevm::vmm::snapshot {
namespace {

constexpr uint32_t kMsrTscDeadline = 0x6e0;
constexpr uint32_t kMsrKvmAsyncPfEnable = 0x4b564d02;  // MSR_KVM_ASYNC_PF_EN

// Top-level records.
enum : uint32_t { kTagVm = 1, kTagVcpu = 2, kTagDevices = 3, kTagVirtio = 4 };
// In kTagVm.
enum : uint32_t { kTagPicMaster = 1, kTagPicSlave, kTagIoapic, kTagPit, kTagClock };
// In kTagVcpu.
enum : uint32_t {
  kTagId = 1, kTagCpuid, kTagRegs, kTagSregs, kTagFpu, kTagXsave, kTagXcrs, kTagMsrs,
  kTagLapic, kTagEvents, kTagMpState, kTagDebugRegs
};
// In kTagDevices: one level each.
enum : uint32_t { kTagSerial = 1, kTagCmos, kTagAcpiPm, kTagI8042 };
// In kTagVirtio (one per device, in slot order).
enum : uint32_t {
  kTagVirtioType = 1, kTagVirtioBar, kTagVirtioRegisters, kTagVirtioQueues, kTagVirtioMsix,
  kTagVsock, kTagVhostUser
};
// In kTagVhostUser.
enum : uint32_t {
  kTagUserType = 1, kTagUserBackendFeatures, kTagUserAckedFeatures, kTagUserProtocolFeatures,
  kTagUserQueueCount, kTagUserQueues, kTagUserConfig
};
// A virtio device has at most this many queues (the transport's limit) and 4 KiB of config.
constexpr size_t kMaxSavedQueues = 1024;
constexpr size_t kMaxSavedConfig = 4096;
// Fields of the device levels.
enum : uint32_t { kTagRegisters = 1, kTagFifo, kTagNvram, kTagOffset, kTagQueue };

void encodeDevices(StateWriter& w, const DeviceStates& d) {
  w.begin(kTagSerial);
  const auto& s = d.serial;
  std::vector<uint8_t> serialRegs = {s.ier, s.lcr, s.mcr, s.lsrErrors, s.msrDelta, s.scr, s.dll,
                                     s.dlm, s.fcr, s.thrInterrupt, s.lastWasLsrRead, s.irqLevel};
  w.bytes(kTagRegisters, serialRegs);
  w.bytes(kTagFifo, s.rxFifo);
  w.end();

  w.begin(kTagCmos);
  std::vector<uint8_t> cmosRegs = {d.cmos.index, d.cmos.regA, d.cmos.regB, d.cmos.flags};
  w.bytes(kTagRegisters, cmosRegs);
  w.pod(kTagNvram, d.cmos.nvram);
  w.pod(kTagOffset, d.cmos.offsetNanos);
  w.end();

  w.begin(kTagAcpiPm);
  w.pod(kTagRegisters, d.acpiPm);
  w.end();

  w.begin(kTagI8042);
  const auto& k = d.i8042;
  w.pod(kTagNvram, k.ram);
  std::vector<uint8_t> i8042Regs = {k.outputPort, k.lastOutput, k.lastWriteWasCommand};
  w.bytes(kTagRegisters, i8042Regs);
  w.pod(kTagOffset, static_cast<int32_t>(k.pendingCommand));
  w.pod(kTagFifo, k.outputBuffer);
  w.podVector(kTagQueue, k.queue);
  w.end();
}

std::vector<uint8_t> exactBytes(const StateReader& r, uint32_t tag, size_t size, const char* what) {
  auto value = r.bytes(tag);
  require(value.size() == size, "state: {} has {} bytes, expected {}", what, value.size(), size);
  return {value.begin(), value.end()};
}

DeviceStates decodeDevices(const StateReader& r) {
  DeviceStates d;
  auto serial = r.level(kTagSerial);
  auto regs = exactBytes(serial, kTagRegisters, 12, "serial registers");
  d.serial = Serial::State{regs[0], regs[1], regs[2], regs[3], regs[4], regs[5], regs[6],
                           regs[7], regs[8], regs[9] != 0, regs[10] != 0, regs[11] != 0, {}};
  auto fifo = serial.bytes(kTagFifo);
  require(fifo.size() <= Serial::kFifoSize, "state: serial FIFO holds {} bytes", fifo.size());
  d.serial.rxFifo.assign(fifo.begin(), fifo.end());

  auto cmos = r.level(kTagCmos);
  regs = exactBytes(cmos, kTagRegisters, 4, "CMOS registers");
  d.cmos.index = regs[0];
  d.cmos.regA = regs[1];
  d.cmos.regB = regs[2];
  d.cmos.flags = regs[3];
  d.cmos.nvram = cmos.pod<decltype(d.cmos.nvram)>(kTagNvram);
  d.cmos.offsetNanos = cmos.pod<int64_t>(kTagOffset);

  d.acpiPm = r.level(kTagAcpiPm).pod<AcpiPm::State>(kTagRegisters);

  auto i8042 = r.level(kTagI8042);
  d.i8042.ram = i8042.pod<decltype(d.i8042.ram)>(kTagNvram);
  regs = exactBytes(i8042, kTagRegisters, 3, "i8042 registers");
  d.i8042.outputPort = regs[0];
  d.i8042.lastOutput = regs[1];
  d.i8042.lastWriteWasCommand = regs[2] != 0;
  d.i8042.pendingCommand = static_cast<int16_t>(i8042.pod<int32_t>(kTagOffset));
  d.i8042.outputBuffer = i8042.pod<int32_t>(kTagFifo);
  d.i8042.queue = i8042.podVector<uint16_t>(kTagQueue);
  require(d.i8042.queue.size() <= 64, "state: i8042 queue holds {} bytes", d.i8042.queue.size());
  return d;
}

void encodeVhostUser(StateWriter& w, const VhostUserDeviceState& d) {
  w.begin(kTagVhostUser);
  w.pod(kTagUserType, d.deviceType);
  w.u64(kTagUserBackendFeatures, d.backendFeatures);
  w.u64(kTagUserAckedFeatures, d.ackedFeatures);
  w.u64(kTagUserProtocolFeatures, d.protocolFeatures);
  w.pod(kTagUserQueueCount, d.numQueues);
  w.podVector(kTagUserQueues, d.queues);
  w.bytes(kTagUserConfig, d.config);
  w.end();
}

VhostUserDeviceState decodeVhostUser(const StateReader& r, const std::string& what) {
  VhostUserDeviceState d;
  d.deviceType = r.pod<uint32_t>(kTagUserType);
  d.backendFeatures = r.u64(kTagUserBackendFeatures);
  d.ackedFeatures = r.u64(kTagUserAckedFeatures);
  d.protocolFeatures = r.u64(kTagUserProtocolFeatures);
  d.numQueues = r.pod<uint16_t>(kTagUserQueueCount);
  d.queues = r.podVector<VhostUserDeviceState::Queue>(kTagUserQueues);
  auto config = r.bytes(kTagUserConfig);
  d.config.assign(config.begin(), config.end());
  require(d.numQueues >= 1 && d.numQueues <= kMaxSavedQueues,
          "{}: vhost-user device with {} queues", what, d.numQueues);
  require(d.queues.size() <= d.numQueues, "{}: vhost-user device has {} started queues of {}",
          what, d.queues.size(), d.numQueues);
  for (size_t i = 0; i < d.queues.size(); ++i) {
    require(d.queues[i].index < d.numQueues && (i == 0 || d.queues[i].index > d.queues[i - 1].index),
            "{}: vhost-user queue records out of order or out of range (queue {})", what,
            d.queues[i].index);
  }
  require(d.config.size() <= kMaxSavedConfig, "{}: vhost-user config space of {} bytes", what,
          d.config.size());
  return d;
}

}  // namespace

std::vector<uint32_t> readableMsrs(const KvmVcpu& vcpu, std::vector<uint32_t> candidates) {
  // KVM_GET_MSRS stops at the first MSR it cannot read: drop that one and ask again.
  while (true) {
    std::vector<kvm_msr_entry> entries(candidates.size());
    for (size_t i = 0; i < candidates.size(); ++i) entries[i].index = candidates[i];
    size_t read = vcpu.getMsrs(entries);
    if (read >= candidates.size()) return candidates;
    candidates.erase(candidates.begin() + static_cast<ptrdiff_t>(read));
  }
}

VcpuState captureVcpu(const KvmVcpu& vcpu, std::vector<kvm_cpuid_entry2> cpuid,
                      const std::vector<uint32_t>& msrIndices, size_t xsaveBytes) {
  VcpuState state;
  state.id = vcpu.id();
  state.cpuid = std::move(cpuid);
  state.regs = vcpu.getRegs();
  state.sregs = vcpu.getSregs();
  state.fpu = vcpu.getFpu();
  state.xsave = vcpu.getXsave(xsaveBytes);
  state.xcrs = vcpu.getXcrs();
  state.msrs.resize(msrIndices.size());
  for (size_t i = 0; i < msrIndices.size(); ++i) state.msrs[i].index = msrIndices[i];
  size_t read = vcpu.getMsrs(state.msrs);
  require(read == state.msrs.size(), "vcpu{}: KVM_GET_MSRS read {} of {} MSRs (stopped at {:#x})",
          vcpu.id(), read, state.msrs.size(),
          read < state.msrs.size() ? state.msrs[read].index : 0);
  state.lapic = vcpu.getLapic();
  state.events = vcpu.getEvents();
  state.mpState = vcpu.getMpState();
  state.debugRegs = vcpu.getDebugRegs();
  return state;
}

void restoreVcpu(KvmVcpu& vcpu, const VcpuState& state, spdlog::logger& log) {
  vcpu.setSregs(state.sregs);
  std::vector<kvm_msr_entry> msrs = state.msrs;
  // No async page faults in a restored VM. Its memory is filled through userfaultfd, and an
  // async fault turns each fill into a "page not present" exception, a kernel worker, a
  // "page ready" interrupt and the wrmsr that acknowledges it. A vCPU that waits for the
  // fill is faster (docs/FORK.md). The guest still thinks they are on and never gets one.
  for (auto& msr : msrs) {
    if (msr.index == kMsrKvmAsyncPfEnable) msr.data = 0;
  }
  // KVM_SET_MSRS stops at the first refused MSR: skip it and carry on with the rest.
  std::span<const kvm_msr_entry> rest(msrs);
  std::vector<uint32_t> refused;
  while (!rest.empty()) {
    size_t set = vcpu.trySetMsrs(rest);
    if (set >= rest.size()) break;
    refused.push_back(rest[set].index);
    rest = rest.subspan(set + 1);
  }
  if (!refused.empty()) {
    std::string list;
    for (uint32_t index : refused) list += fmt::format(" {:#x}", index);
    log.warn("vcpu{}: KVM refused {} saved MSR(s):{}", vcpu.id(), refused.size(), list);
  }
  vcpu.setRegs(state.regs);
  vcpu.setFpu(state.fpu);
  vcpu.setXsave(state.xsave);
  vcpu.setXcrs(state.xcrs);
  vcpu.setDebugRegs(state.debugRegs);
  vcpu.setLapic(state.lapic);
  // Setting the LAPIC resets its deadline timer: arm it again from the saved MSR.
  for (const auto& msr : state.msrs) {
    if (msr.index == kMsrTscDeadline) vcpu.trySetMsrs(std::span(&msr, 1));
  }
  vcpu.setMpState(state.mpState);
  kvm_vcpu_events events = state.events;
  // Restore every part of the events we saved; SMM and the NMI/SIPI fields included.
  events.flags = KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR |
                 KVM_VCPUEVENT_VALID_SHADOW | (state.events.flags & KVM_VCPUEVENT_VALID_SMM);
  vcpu.setEvents(events);
}

KvmVmState captureVm(const KvmVm& vm) {
  KvmVmState state;
  state.picMaster = vm.getIrqchip(KVM_IRQCHIP_PIC_MASTER);
  state.picSlave = vm.getIrqchip(KVM_IRQCHIP_PIC_SLAVE);
  state.ioapic = vm.getIrqchip(KVM_IRQCHIP_IOAPIC);
  state.pit = vm.getPit();
  state.clock = vm.getClock();
  return state;
}

void restoreVm(KvmVm& vm, const KvmVmState& state) {
  vm.setIrqchip(state.picMaster);
  vm.setIrqchip(state.picSlave);
  vm.setIrqchip(state.ioapic);
  vm.setPit(state.pit);
  vm.setClock(state.clock);
}

std::vector<uint8_t> encodeMachineState(const MachineState& state) {
  StateWriter w;
  w.begin(kTagVm);
  w.pod(kTagPicMaster, state.vm.picMaster);
  w.pod(kTagPicSlave, state.vm.picSlave);
  w.pod(kTagIoapic, state.vm.ioapic);
  w.pod(kTagPit, state.vm.pit);
  w.pod(kTagClock, state.vm.clock);
  w.end();
  for (const auto& v : state.vcpus) {
    w.begin(kTagVcpu);
    w.pod(kTagId, v.id);
    w.podVector(kTagCpuid, v.cpuid);
    w.pod(kTagRegs, v.regs);
    w.pod(kTagSregs, v.sregs);
    w.pod(kTagFpu, v.fpu);
    w.podVector(kTagXsave, v.xsave);
    w.pod(kTagXcrs, v.xcrs);
    w.podVector(kTagMsrs, v.msrs);
    w.pod(kTagLapic, v.lapic);
    w.pod(kTagEvents, v.events);
    w.pod(kTagMpState, v.mpState);
    w.pod(kTagDebugRegs, v.debugRegs);
    w.end();
  }
  w.begin(kTagDevices);
  encodeDevices(w, state.devices);
  w.end();
  for (const auto& device : state.virtio) {
    w.begin(kTagVirtio);
    w.pod(kTagVirtioType, device.deviceType);
    w.u64(kTagVirtioBar, device.barAddress);
    w.pod(kTagVirtioRegisters, device.transport.registers);
    w.podVector(kTagVirtioQueues, device.transport.queues);
    w.podVector(kTagVirtioMsix, device.transport.msixTable);
    if (device.vsock) w.pod(kTagVsock, *device.vsock);
    if (device.vhostUser) encodeVhostUser(w, *device.vhostUser);
    w.end();
  }
  return w.finish();
}

MachineState decodeMachineState(std::span<const uint8_t> data, const std::string& what) {
  auto file = StateReader::file(data, what);
  MachineState state;
  auto vm = file.level(kTagVm);
  state.vm.picMaster = vm.pod<kvm_irqchip>(kTagPicMaster);
  state.vm.picSlave = vm.pod<kvm_irqchip>(kTagPicSlave);
  state.vm.ioapic = vm.pod<kvm_irqchip>(kTagIoapic);
  require(state.vm.picMaster.chip_id == KVM_IRQCHIP_PIC_MASTER &&
              state.vm.picSlave.chip_id == KVM_IRQCHIP_PIC_SLAVE &&
              state.vm.ioapic.chip_id == KVM_IRQCHIP_IOAPIC,
          "{}: irqchip records are out of order", what);
  state.vm.pit = vm.pod<kvm_pit_state2>(kTagPit);
  state.vm.clock = vm.pod<kvm_clock_data>(kTagClock);
  for (const auto& v : file.all(kTagVcpu)) {
    VcpuState vcpu;
    vcpu.id = v.pod<uint32_t>(kTagId);
    require(vcpu.id == state.vcpus.size(), "{}: vCPU {} where {} was expected", what, vcpu.id,
            state.vcpus.size());
    vcpu.cpuid = v.podVector<kvm_cpuid_entry2>(kTagCpuid);
    require(!vcpu.cpuid.empty() && vcpu.cpuid.size() <= 256, "{}: vcpu{} has {} CPUID entries",
            what, vcpu.id, vcpu.cpuid.size());
    vcpu.regs = v.pod<kvm_regs>(kTagRegs);
    vcpu.sregs = v.pod<kvm_sregs>(kTagSregs);
    vcpu.fpu = v.pod<kvm_fpu>(kTagFpu);
    vcpu.xsave = v.podVector<uint32_t>(kTagXsave);
    require(vcpu.xsave.size() * 4 >= sizeof(kvm_xsave) && vcpu.xsave.size() * 4 <= (1u << 20),
            "{}: vcpu{} XSAVE area of {} bytes", what, vcpu.id, vcpu.xsave.size() * 4);
    vcpu.xcrs = v.pod<kvm_xcrs>(kTagXcrs);
    vcpu.msrs = v.podVector<kvm_msr_entry>(kTagMsrs);
    vcpu.lapic = v.pod<kvm_lapic_state>(kTagLapic);
    vcpu.events = v.pod<kvm_vcpu_events>(kTagEvents);
    vcpu.mpState = v.pod<kvm_mp_state>(kTagMpState);
    vcpu.debugRegs = v.pod<kvm_debugregs>(kTagDebugRegs);
    state.vcpus.push_back(std::move(vcpu));
  }
  require(!state.vcpus.empty(), "{}: no vCPU state", what);
  state.devices = decodeDevices(file.level(kTagDevices));
  for (const auto& v : file.all(kTagVirtio)) {
    VirtioDeviceState device;
    device.deviceType = v.pod<uint32_t>(kTagVirtioType);
    device.barAddress = v.u64(kTagVirtioBar);
    device.transport.registers = v.pod<VirtioPciState::Registers>(kTagVirtioRegisters);
    device.transport.queues = v.podVector<VirtioPciState::Queue>(kTagVirtioQueues);
    device.transport.msixTable = v.podVector<VirtioPciState::MsixEntry>(kTagVirtioMsix);
    if (v.has(kTagVsock)) device.vsock = v.pod<VhostVsockState>(kTagVsock);
    if (v.has(kTagVhostUser)) device.vhostUser = decodeVhostUser(v.level(kTagVhostUser), what);
    require(!(device.vsock && device.vhostUser), "{}: virtio device {} is both vsock and "
            "vhost-user", what, state.virtio.size());
    state.virtio.push_back(std::move(device));
  }
  return state;
}

}  // namespace clonevm::vmm::snapshot
