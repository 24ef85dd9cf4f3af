// Machine: writing a template (snapshot) and building a VM from one (restore).
#include <fcntl.h>
#include <malloc.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>

#include <fmt/ranges.h>

#include "common/error.h"
#include "common/unique_fd.h"
#include "vmm-core/devices/pci_root.h"
#include "vmm-core/memory/lazy_fill.h"
#include "vmm-core/snapshot/machine_state.h"
#include "vmm-core/snapshot/template_files.h"
#include "vmm-core/snapshot/working_set_file.h"
#include "vmm-core/vm/legacy_devices.h"
#include "vmm-core/vm/machine.h"
#include "vmm-core/vm/vcpu_runner.h"

namespace clonevm::vmm {
namespace {

using namespace snapshot;

// How long a fork's working-set record runs when nobody ends it (Machine::endWorkingSetWindow:
// `clone fork` does, once its exec through the agent has answered). Long enough for a fresh
// fork's first answers in the lab, where each takes seconds.
constexpr auto kWorkingSetWindowLimit = std::chrono::seconds(10);

const std::vector<std::string> kCoreDevices = {"serial-16550 (COM1)", "i8042", "cmos-rtc",
                                               "acpi-pm", "pci-host-bridge"};

// The template's working set, or none when its file is missing or unusable (with a warning).
GuestMemory::ResidentPages readWorkingSet(const std::string& path, uint64_t memorySize,
                                          spdlog::logger& log) {
  try {
    auto set = readWorkingSetFile(path, memorySize);
    return {.pages = std::move(set.pages), .written = std::move(set.written)};
  } catch (const std::exception& e) {
    log.warn("{}, ignored", e.what());
    return {};
  }
}

}  // namespace

std::vector<VirtioDeviceState> Machine::saveVirtioDevices(
    const std::vector<VhostUserDeviceState>& vhostUser) {
  std::vector<VirtioDeviceState> states;
  for (size_t i = 0; i < virtioDevices_.size(); ++i) {
    const auto& placement = virtioPlacements_[i];
    // A fork places BAR 0 where the VMM does; one the guest moved would not be decoded.
    auto decoded = devices_->pciRoot().barAddress(placement.bdf, 0);
    require(!decoded || *decoded == placement.bar,
            "cannot snapshot: the guest moved BAR 0 of {} from {:#x} to {:#x}",
            placement.bdf.toString(), placement.bar, *decoded);
    VirtioDeviceState state;
    state.deviceType = isVsockSlot(i) ? vsock_->deviceType() : 0;
    state.barAddress = placement.bar;
    state.transport = virtioDevices_[i]->saveState();
    if (isVsockSlot(i)) state.vsock = vsock_->saveState();
    if (i < vhostUser.size()) {
      state.deviceType = vhostUser[i].deviceType;
      state.vhostUser = vhostUser[i];
    }
    states.push_back(std::move(state));
  }
  return states;
}

void Machine::restoreVirtioDevices(const std::vector<VirtioDeviceState>& states,
                                   const std::string& templateDir) {
  require(states.size() == virtioDevices_.size(),
          "{}: the template has {} virtio devices, this VM {}", templateDir, states.size(),
          virtioDevices_.size());
  for (size_t i = 0; i < states.size(); ++i) {
    const auto& state = states[i];
    bool isVsock = isVsockSlot(i);
    bool isVhostUser = i < vhostUserBackends_.size();
    require(state.barAddress == virtioPlacements_[i].bar && isVsock == state.vsock.has_value() &&
                isVhostUser == state.vhostUser.has_value(),
            "{}: virtio device {} (type {}, BAR {:#x}) does not match this VM's", templateDir, i,
            state.deviceType, state.barAddress);
    // The ring positions first: the transport re-activates the backend, which applies them.
    if (isVsock) vsock_->restoreState(*state.vsock);
    if (isVhostUser) vhostUserBackends_[i]->restoreState(*state.vhostUser);
    virtioDevices_[i]->restoreState(state.transport);
  }
  devices_->pciRoot().refreshDecoding();
  // The fork has its own CID (chosen when the device was built); the guest re-reads it on
  // this event and resets the connections it had in the template.
  if (vsock_ && vsock_->active() && !config_.vsockCidLater) {
    if (!vsock_->sendTransportReset()) log_.warn("vsock: the fork's guest keeps the template's CID");
  }
}

uint64_t Machine::prefaultWorkingSet(const std::function<bool()>& stop) {
  if (restoredWorkingSet_.pages.empty() || vcpuCpuids_.empty()) return 0;
  auto begin = Clock::now();
  // The pages the recording fork wrote become this process's copies first, so that KVM maps
  // them writable below and the guest's first writes to them do not exit (a nested exit each).
  // A memfd's pages are all written in place: each is mapped writable now, which copies
  // nothing, or KVM would map it read-only from the helper's read and exit on the first write.
  uint64_t madeWritable = memory_.populateWritable(
      memory_.copyOnWrite() ? restoredWorkingSet_.written : restoredWorkingSet_.pages);
  std::vector<uint64_t> addresses;
  addresses.reserve(restoredWorkingSet_.pages.size());
  for (uint64_t offset : restoredWorkingSet_.pages) {
    for (const auto& region : memory_.regions()) {
      if (offset >= region.fdOffset && offset < region.fdOffset + region.size) {
        addresses.push_back(region.guestAddress + (offset - region.fdOffset));
        break;
      }
    }
  }
  restoredWorkingSet_ = {};
  prefault_ = NestedPagePrefault::run(vm_, config_.vcpuCount, vcpuCpuids_[0], addresses,
                                      memory_.endAddress(), stop, log_);
  log_.info("prefault: {} of {} working-set pages read into KVM's page tables ({} copied ahead "
            "to be written) in {:.1f} ms",
            prefault_->pagesRead(), addresses.size(), madeWritable,
            std::chrono::duration<double, std::milli>(Clock::now() - begin).count());
  return prefault_->pagesRead();
}

void Machine::assignForkVsockCid(uint64_t cid) {
  require(vsock_ != nullptr || cid == 0, "vsock CID {} asked for, but the template has no vsock device", cid);
  if (vsock_ == nullptr) return;
  if (cid != 0 && cid != vsock_->guestCid()) {
    vsock_->setGuestCid(cid);  // sends the transport reset when the device is active
  } else if (!guestKnowsForkCid_ && vsock_->active() && !vsock_->sendTransportReset()) {
    log_.warn("vsock: the fork's guest keeps the template's CID");
  }
  guestKnowsForkCid_ = true;
}

void Machine::restoreFromTemplate() {
  const VerifiedTemplate& source = *config_.restoreFrom;
  const Manifest& manifest = source.manifest;
  require(manifest.memoryBytes == memory_.size() && manifest.vcpus == config_.vcpuCount,
          "{}: the machine does not match the manifest", source.dir);
  for (size_t i = 0; i < manifest.regions.size(); ++i) {
    const auto& want = manifest.regions[i];
    require(i < memory_.regions().size() &&
                memory_.regions()[i].guestAddress == want.guestAddress &&
                memory_.regions()[i].size == want.size &&
                memory_.regions()[i].fdOffset == want.fileOffset,
            "{}: memory layout differs from this build's", source.dir);
  }
  MachineState state = decodeMachineState(source.state, source.dir + "/" + kStateFile);
  require(state.vcpus.size() == config_.vcpuCount, "{}: state has {} vCPUs, the manifest {}",
          source.dir, state.vcpus.size(), config_.vcpuCount);

  double mappedMs = timings_.memoryReady, decodedMs = millisSinceStart();
  // From here on KVM may touch guest memory (kvmclock, LAPIC pages).
  prepareRestoredMemory(source);
  double prefetchedMs = millisSinceStart();
  for (uint32_t id = 0; id < config_.vcpuCount; ++id) {
    auto vcpu = std::make_unique<KvmVcpu>(vm_, id);
    vcpu->setCpuid(state.vcpus[id].cpuid);
    vcpuCpuids_.push_back(state.vcpus[id].cpuid);
    vcpus_.push_back(std::move(vcpu));
  }
  attachDevices();
  // A vhost-user back-end (a disk's clone-block) maps this memfd too. With postcopy its
  // faults come to the fill like the core's own. Without it, its accesses bypass the core's
  // userfaultfd and a page it touched first would stay a zero page: such a fork gets all of
  // the template's data now, before any queue starts (docs/FORK.md).
  std::vector<std::string> withoutPostcopy;
  for (const auto& backend : vhostUserBackends_) {
    if (!backend->postcopy()) withoutPostcopy.push_back(backend->config().socketPath);
  }
  if (!withoutPostcopy.empty()) {
    uint64_t pages = lazyFill_->fillAllData();
    log_.info("filled all {} data pages ({} MiB) of {} up front: vhost-user back-end {} does "
              "not do postcopy",
              pages, pages * LazyMemoryFill::kPageBytes >> 20, source.dir,
              fmt::join(withoutPostcopy, ", "));
    if (withoutPostcopy.size() == vhostUserBackends_.size()) {
      // What is left are holes. With no back-end's faults to resolve either, the userfaultfd
      // has nothing to do that the kernel's shmem fault would not do without a round trip.
      lazyFill_->handHolesToTheKernel();
      // The fill mapped every data page into this process; from a clean page table, the
      // pages this fork touches show as present, data or hole, as a copy-on-write fork's
      // do: its working set is recorded from them, and spares prefault it (in the lab a
      // disk fork's guest otherwise met ~650 nested page faults before its exec answered).
      memory_.unmapPagesKeepingContents();
      filledUpFront_ = true;
    } else if (recordWorkingSetPending_) {
      // Its faults show only the holes the core touched, and a postcopy back-end's: no record.
      recordWorkingSetPending_ = false;
      std::lock_guard lock(recordedWorkingSetMutex_);
      workingSetRecording_ = false;
    }
  }
  timings_.memoryReady = millisSinceStart();
  restoreVm(vm_, state.vm);
  for (uint32_t id = 0; id < config_.vcpuCount; ++id) {
    restoreVcpu(*vcpus_[id], state.vcpus[id], log_);
  }
  devices_->restoreState(state.devices);
  restoreVirtioDevices(state.virtio, source.dir);
  timings_.vcpusReady = millisSinceStart();
  auto stats = memoryFillStats();
  log_.info("restored from {}: {} vCPUs, {} MiB, {} pages prefetched ({} KiB); {:.1f} ms after "
            "main began (memory mapped at {:.1f} ms, state decoded at {:.1f}, working set "
            "mapped at {:.1f}, devices ready at {:.1f})",
            source.dir, config_.vcpuCount, memory_.size() >> 20, stats.prefetchedPages,
            stats.prefetchedPages * LazyMemoryFill::kPageBytes / 1024, timings_.vcpusReady,
            mappedMs, decodedMs, prefetchedMs, timings_.memoryReady);
  // The template's state and extent map were decoded into buffers now freed: give their
  // pages back, or each fork keeps them.
  ::malloc_trim(0);
}

void Machine::prepareRestoredMemory(const VerifiedTemplate& source) {
  auto workingSet = readWorkingSet(source.dir + "/" + kWorkingSetFile, memory_.size(), log_);
  if (config_.vsockCidLater) restoredWorkingSet_ = workingSet;  // a spare prefaults it
  // Record this fork's first touches when the template has no working set yet.
  recordWorkingSetPending_ =
      workingSet.pages.empty() && ::access((source.dir + "/" + kWorkingSetFile).c_str(), F_OK) != 0;
  {
    std::lock_guard lock(recordedWorkingSetMutex_);
    workingSetRecording_ = recordWorkingSetPending_;
  }
  if (memory_.copyOnWrite()) {
    // Nothing to fill: the kernel maps the template's page cache on each first touch. The
    // working set is mapped now so that the vCPUs' first steps take fewer faults.
    copyOnWritePrefetchedPages_ = memory_.populate(workingSet.pages);
    return;
  }
  lazyFill_ = std::make_unique<LazyMemoryFill>(memory_, source.dir + "/" + kMemoryFile,
                                               source.memoryExtentPairs(), log_);
  lazyFill_->prefetch(workingSet.pages);
  lazyFill_->start(/*recordFaults=*/recordWorkingSetPending_);
}

LazyMemoryFill::Stats Machine::memoryFillStats() const {
  if (memory_.copyOnWrite()) return {.prefetchedPages = copyOnWritePrefetchedPages_};
  return lazyFill_ ? lazyFill_->stats() : LazyMemoryFill::Stats{};
}

void Machine::recordWorkingSet() {
  if (!recordWorkingSetPending_) return;
  recordWorkingSetPending_ = false;
  std::string dir = config_.restoreFrom->dir;
  workingSetRecorder_ = std::thread([this, dir] {
    auto windowStart = Clock::now();
    const char* endedBy;
    {
      std::unique_lock lock(recordedWorkingSetMutex_);
      bool ended = workingSetWindowEnd_.wait_for(lock, kWorkingSetWindowLimit,
                                                 [this] { return workingSetWindowEndedBy_ != nullptr; });
      endedBy = ended ? workingSetWindowEndedBy_ : "at its limit";
    }
    log_.info("working-set window ended {} after {:.0f} ms", endedBy,
              std::chrono::duration<double, std::milli>(Clock::now() - windowStart).count());
    std::optional<GuestMemory::ResidentPages> set;
    try {
      if (lazyFill_ != nullptr && !filledUpFront_) {
        set = GuestMemory::ResidentPages{.pages = lazyFill_->endRecording()};
      } else {
        // Copy-on-write memory, or memory filled up front: what the vCPUs mapped so far.
        set = memory_.residentPages();
      }
    } catch (const std::exception& e) {
      log_.warn("recording the template's working set: {}", e.what());
    }
    {
      std::lock_guard lock(recordedWorkingSetMutex_);
      recordedWorkingSet_ = set;
      workingSetRecording_ = false;
    }
    if (!set) return;
    try {
      if (linkWorkingSetFile(AT_FDCWD, dir, {set->pages, set->written}, "recorder")) {
        log_.info("recorded the template's working set: {} pages ({} KiB, {} of them written) in {}/{}",
                  set->pages.size(), set->pages.size() * LazyMemoryFill::kPageBytes / 1024,
                  set->written.size(), dir, kWorkingSetFile);
      }
    } catch (const std::exception& e) {
      // A jailed fork: `clone fork` fetches it through the API and writes it.
      log_.info("recorded the template's working set ({} pages), kept for the API: {}",
                set->pages.size(), e.what());
    }
  });
}

void Machine::endWorkingSetWindow(const char* endedBy) {
  {
    std::lock_guard lock(recordedWorkingSetMutex_);
    if (workingSetWindowEndedBy_ == nullptr) workingSetWindowEndedBy_ = endedBy;
  }
  workingSetWindowEnd_.notify_all();
}

bool Machine::recordingWorkingSet() const {
  std::lock_guard lock(recordedWorkingSetMutex_);
  return workingSetRecording_;
}

std::optional<GuestMemory::ResidentPages> Machine::recordedWorkingSet() const {
  std::lock_guard lock(recordedWorkingSetMutex_);
  return recordedWorkingSet_;
}

SnapshotResult Machine::snapshot(const SnapshotOptions& options) {
  // A template holds vhost-user-blk disks served by clone-block: their ring positions are
  // saved here and `clone snapshot` copies the image (the core cannot see it). A virtio-fs
  // share's state lives in virtiofsd, and a disk without image= cannot be copied.
  for (const auto& backend : vhostUserBackends_) {
    const auto& device = backend->config();
    require(device.kind == VhostUserDeviceKind::kBlock,
            "cannot snapshot: {} {} is a virtio-fs share; templates hold only clone-block disks "
            "(docs/FORK.md)", vhostUserKindName(device.kind), device.socketPath);
    require(!device.imagePath.empty(),
            "cannot snapshot: the disk on vhost-user-blk {} was not started by `clone run --disk` "
            "(no image=): a template needs a copy of every disk (docs/FORK.md)", device.socketPath);
  }
  require(!runners_.empty(), "the VM has not started");
  require(options.outputDirFd >= 0, "snapshot to {}: no open output directory", options.outputDir);
  std::lock_guard snapshotLock(snapshotMutex_);
  bool wasPaused = paused_;
  auto pauseStart = Clock::now();
  if (!wasPaused) pause();
  SnapshotResult result;
  std::vector<VhostUserDeviceState> disks;
  try {
    // First: the back-ends complete what they have in flight, which writes guest memory and
    // raises interrupts that the vCPU and irqchip state below must hold. The disks' queues
    // stay stopped until the vCPUs run again (resume()), so that `clone snapshot` can copy
    // the images of a VM left paused.
    {
      std::lock_guard lock(pauseMutex_);
      disksSuspended_ = true;
    }
    for (auto& backend : vhostUserBackends_) disks.push_back(backend->suspend());
    MachineState state;
    state.vm = captureVm(vm_);
    auto msrs = readableMsrs(*vcpus_[0], kvm_.msrIndexList());
    size_t xsaveBytes = kvm_.xsaveSize();
    for (size_t i = 0; i < vcpus_.size(); ++i) {
      state.vcpus.push_back(captureVcpu(*vcpus_[i], vcpuCpuids_[i], msrs, xsaveBytes));
    }
    devices_->saveState(state.devices);
    // The kernel must stop writing the vsock rings (guest memory) before memory is saved.
    if (vsock_) vsock_->stop();
    state.virtio = saveVirtioDevices(disks);
    auto stateBytes = encodeMachineState(state);
    writeReadOnlyFileAt(options.outputDirFd, options.outputDir, kStateFile, stateBytes.data(),
                        stateBytes.size());

    std::string memoryPath = options.outputDir + "/" + kMemoryFile;
    UniqueFd image = createTemplateFile(options.outputDirFd, options.outputDir, kMemoryFile, 0644);
    auto extents = writeSparseMemoryImage(
        restored() ? -1 : memory_.fd(), memory_.size(), image.get(), memoryPath,
        restored() ? memory_.mappingForRegistration().data() : nullptr);
    if (vsock_) vsock_->start();
    std::vector<VhostUserDeviceState> savedDisks = std::move(disks);
    if (!wasPaused && !options.leavePaused) resume();
    result.pausedMillis = std::chrono::duration<double, std::milli>(Clock::now() - pauseStart).count();

    Manifest manifest;
    manifest.createdUtc = currentUtcTime();
    manifest.memoryBytes = memory_.size();
    for (const auto& region : memory_.regions()) {
      manifest.regions.push_back({region.guestAddress, region.size, region.fdOffset});
    }
    manifest.vcpus = config_.vcpuCount;
    manifest.kernel = config_.kernelPath;
    manifest.initrd = config_.initrdPath;
    manifest.cmdline = config_.cmdline;
    manifest.devices = kCoreDevices;
    if (vsock_) manifest.devices.push_back(kVsockDeviceName);
    for (size_t i = 0; i < savedDisks.size(); ++i) {
      const auto& device = vhostUserBackends_[i]->config();
      const auto& saved = savedDisks[i];
      uint64_t sectors = 0;
      require(saved.config.size() >= 8, "{}: no capacity in its config space", device.socketPath);
      std::memcpy(&sectors, saved.config.data(), 8);
      constexpr unsigned kBlkFeatureReadOnly = 5;  // VIRTIO_BLK_F_RO
      manifest.disks.push_back({.file = fmt::format("disk{}.raw", i),
                                .source = device.imagePath,
                                .sourceFormat = device.imageFormat.empty() ? "auto" : device.imageFormat,
                                .bytes = sectors * 512,
                                .readOnly = ((saved.backendFeatures >> kBlkFeatureReadOnly) & 1) != 0,
                                .queues = saved.numQueues,
                                .sha256 = {}});
    }
    for (const auto& leaf : vcpuCpuids_[0]) {
      manifest.cpuid.push_back({leaf.function, leaf.index, leaf.flags, leaf.eax, leaf.ebx,
                                leaf.ecx, leaf.edx});
    }
    manifest.stateSize = stateBytes.size();
    manifest.stateSha256 = sha256Hex(stateBytes.data(), stateBytes.size());
    describeMemoryImage(image.get(), memory_.size(), extents, manifest, memoryPath);
    std::string json = toJson(manifest);
    writeReadOnlyFileAt(options.outputDirFd, options.outputDir, kManifestFile, json.data(),
                        json.size());
    result.memoryDataBytes = manifest.memoryDataBytes;
    result.stateBytes = stateBytes.size();
  } catch (...) {
    if (vsock_) vsock_->start();
    // A VM that stays paused gets its disks back when it resumes.
    if (!wasPaused && paused_ && !options.leavePaused) resume();
    throw;
  }
  log_.info("snapshot written to {}: {} MiB of data in {} MiB, state {} bytes, vCPUs paused {:.1f} ms",
            options.outputDir, result.memoryDataBytes >> 20, memory_.size() >> 20,
            result.stateBytes, result.pausedMillis);
  return result;
}

}  // namespace clonevm::vmm
