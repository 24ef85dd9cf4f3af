#include "vmm-core/memory/guest_memory.h"

#include <sys/mman.h>
#include <unistd.h>

#include <fstream>
#include <utility>

#include "common/error.h"
#include "vmm-core/arch/layout.h"

namespace clonevm::vmm {

GuestMemory GuestMemory::create(uint64_t size, const std::string& name, bool hugePages) {
  require(size >= 2 * layout::kMiB && size % (2 * layout::kMiB) == 0,
          "guest memory size must be a non-zero multiple of 2 MiB, got {} bytes", size);
  GuestMemory memory;
  memory.fd_ = UniqueFd(CLONE_SYSCALL(::memfd_create(name.c_str(), MFD_CLOEXEC | MFD_ALLOW_SEALING),
                                      "memfd_create guest memory", name));
  CLONE_SYSCALL(::ftruncate(memory.fd_.get(), static_cast<off_t>(size)),
                "size guest memory memfd", name);
  void* mapping = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE,
                         memory.fd_.get(), 0);
  if (mapping == MAP_FAILED) throwSystemError(errno, "mmap guest memory", name);
  memory.mapping_ = static_cast<uint8_t*>(mapping);
  memory.size_ = size;
  // THP for shmem is per-mount policy; the hint is harmless where it is off.
  if (hugePages) ::madvise(mapping, size, MADV_HUGEPAGE);

  uint64_t low = std::min(size, layout::kLowRamEnd);
  memory.regions_.push_back({0, low, 0, memory.mapping_});
  if (size > low) {
    memory.regions_.push_back({layout::kHighRamStart, size - low, low, memory.mapping_ + low});
  }
  return memory;
}

bool GuestMemory::hostGivesShmemHugePages() {
  std::ifstream setting("/sys/kernel/mm/transparent_hugepage/shmem_enabled");
  std::string line;
  std::getline(setting, line);
  // The active choice is bracketed: "always within_size advise [never] deny force".
  return line.find("[never]") == std::string::npos && line.find("[deny]") == std::string::npos &&
         !line.empty();
}

GuestMemory::GuestMemory(GuestMemory&& other) noexcept
    : fd_(std::move(other.fd_)),
      size_(std::exchange(other.size_, 0)),
      mapping_(std::exchange(other.mapping_, nullptr)),
      regions_(std::move(other.regions_)) {}

GuestMemory& GuestMemory::operator=(GuestMemory&& other) noexcept {
  if (this != &other) {
    if (mapping_ != nullptr) ::munmap(mapping_, size_);
    fd_ = std::move(other.fd_);
    size_ = std::exchange(other.size_, 0);
    mapping_ = std::exchange(other.mapping_, nullptr);
    regions_ = std::move(other.regions_);
  }
  return *this;
}

GuestMemory::~GuestMemory() {
  if (mapping_ != nullptr) ::munmap(mapping_, size_);
}

uint64_t GuestMemory::endAddress() const {
  const auto& last = regions_.back();
  return last.guestAddress + last.size;
}

bool GuestMemory::contains(uint64_t address, uint64_t length) const {
  for (const auto& region : regions_) {
    if (address >= region.guestAddress && address - region.guestAddress <= region.size &&
        length <= region.size - (address - region.guestAddress)) {
      return true;
    }
  }
  return false;
}

std::span<uint8_t> GuestMemory::slice(uint64_t address, uint64_t length) const {
  for (const auto& region : regions_) {
    if (address >= region.guestAddress && address - region.guestAddress <= region.size &&
        length <= region.size - (address - region.guestAddress)) {
      return {region.host + (address - region.guestAddress), length};
    }
  }
  throw Error(fmt::format("guest range {:#x}+{:#x} is outside guest memory", address, length));
}

void GuestMemory::write(uint64_t address, std::span<const uint8_t> bytes) const {
  std::memcpy(slice(address, bytes.size()).data(), bytes.data(), bytes.size());
}

void GuestMemory::read(uint64_t address, std::span<uint8_t> bytes) const {
  std::memcpy(bytes.data(), slice(address, bytes.size()).data(), bytes.size());
}

}  // namespace clonevm::vmm
