#include "vmm-core/snapshot/working_set_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "common/error.h"
#include "common/unique_fd.h"
#include "vmm-core/snapshot/template_files.h"

namespace clonevm::vmm::snapshot {
namespace {

constexpr char kMagicV1[8] = {'C', 'L', 'W', 'S', 'E', 'T', '0', '1'};
constexpr char kMagic[8] = {'C', 'L', 'W', 'S', 'E', 'T', '0', '2'};
constexpr uint64_t kWrittenBit = 1;
constexpr uint64_t kHeaderBytes = 24;
constexpr off_t kMaxFileBytes = 64 << 20;

}  // namespace

WorkingSet readWorkingSetFile(const std::string& path, uint64_t memorySize) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT) return {};
    throwSystemError(errno, "open working set file", path);
  }
  struct stat st {};
  CLONE_SYSCALL(::fstat(fd.get(), &st), "stat working set file", path);
  require(st.st_size >= static_cast<off_t>(kHeaderBytes) && st.st_size <= kMaxFileBytes,
          "{}: {} bytes is no working set file", path, st.st_size);
  std::vector<uint8_t> bytes(static_cast<size_t>(st.st_size));
  require(::pread(fd.get(), bytes.data(), bytes.size(), 0) == st.st_size, "{}: short read", path);
  uint64_t granule = 0;
  uint64_t count = 0;
  std::memcpy(&granule, bytes.data() + 8, 8);
  std::memcpy(&count, bytes.data() + 16, 8);
  bool version2 = std::memcmp(bytes.data(), kMagic, 8) == 0;
  require(version2 || std::memcmp(bytes.data(), kMagicV1, 8) == 0, "{}: not a working set file", path);
  require(granule >= kPageSize && granule <= (2 << 20) && (granule & (granule - 1)) == 0,
          "{}: granularity {} is not a power of two from 4 KiB to 2 MiB", path, granule);
  require((bytes.size() - kHeaderBytes) % 8 == 0 && count == (bytes.size() - kHeaderBytes) / 8,
          "{}: its count {} does not match its size", path, count);
  WorkingSet set;
  for (uint64_t i = 0; i < count; ++i) {
    uint64_t entry = 0;
    std::memcpy(&entry, bytes.data() + kHeaderBytes + i * 8, 8);
    bool written = version2 && (entry & kWrittenBit) != 0;
    uint64_t offset = version2 ? entry & ~kWrittenBit : entry;
    if (offset % granule != 0 || offset >= memorySize || memorySize - offset < granule) continue;
    for (uint64_t page = offset; page < offset + granule; page += kPageSize) {
      set.pages.push_back(page);
      if (written) set.written.push_back(page);
    }
  }
  return set;
}

void checkWorkingSet(const WorkingSet& set, uint64_t memorySize) {
  auto check = [memorySize](const std::vector<uint64_t>& offsets, const char* what) {
    for (size_t i = 0; i < offsets.size(); ++i) {
      uint64_t offset = offsets[i];
      require(offset % kPageSize == 0, "{} page {:#x} is not 4 KiB aligned", what, offset);
      require(offset < memorySize, "{} page {:#x} lies beyond the guest's {} MiB", what, offset,
              memorySize >> 20);
      require(i == 0 || offsets[i - 1] < offset, "{} pages are not in increasing order at {:#x}",
              what, offset);
    }
  };
  check(set.pages, "a working-set");
  check(set.written, "a written");
  for (uint64_t offset : set.written) {
    require(std::binary_search(set.pages.begin(), set.pages.end(), offset),
            "written page {:#x} is not in the working set", offset);
  }
}

bool linkWorkingSetFile(int dirFd, const std::string& dir, const WorkingSet& set,
                        const std::string& writer) {
  std::vector<uint8_t> bytes(kHeaderBytes + set.pages.size() * 8);
  uint64_t granule = kPageSize;
  uint64_t count = set.pages.size();
  std::memcpy(bytes.data(), kMagic, 8);
  std::memcpy(bytes.data() + 8, &granule, 8);
  std::memcpy(bytes.data() + 16, &count, 8);
  for (uint64_t i = 0; i < count; ++i) {
    uint64_t entry = set.pages[i];
    if (std::binary_search(set.written.begin(), set.written.end(), entry)) entry |= kWrittenBit;
    std::memcpy(bytes.data() + kHeaderBytes + i * 8, &entry, 8);
  }
  std::string temporary = fmt::format("{}.tmp.{}.{}", kWorkingSetFile, ::getpid(), writer);
  auto name = [&](const std::string& file) { return dirFd == AT_FDCWD ? dir + "/" + file : file; };
  ::unlinkat(dirFd, name(temporary).c_str(), 0);  // left by a writer that died mid-write
  writeReadOnlyFileAt(dirFd, dir, temporary, bytes.data(), bytes.size());
  int linked = ::linkat(dirFd, name(temporary).c_str(), dirFd, name(kWorkingSetFile).c_str(), 0);
  int linkError = errno;
  ::unlinkat(dirFd, name(temporary).c_str(), 0);
  if (linked == 0) return true;
  if (linkError == EEXIST) return false;
  throwSystemError(linkError, "put the working set file in place", dir + "/" + kWorkingSetFile);
}

}  // namespace clonevm::vmm::snapshot
