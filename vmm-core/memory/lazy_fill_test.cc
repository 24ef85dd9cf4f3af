// LazyMemoryFill on a real userfaultfd, no KVM: this thread's own reads of guest memory fault
// and the fill thread resolves them. Needs userfaultfd (root, CAP_SYS_PTRACE or
// vm.unprivileged_userfaultfd=1); skipped otherwise.
#include "vmm-core/memory/lazy_fill.h"

#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <thread>

#include <gtest/gtest.h>
#include <spdlog/spdlog.h>

#include "common/error.h"
#include "common/userfaultfd.h"
#include "jailer/seccomp/seccomp_policy.h"
#include "vmm-core/arch/layout.h"

namespace clonevm::vmm {
namespace {

constexpr uint64_t kPage = LazyMemoryFill::kPageBytes;
constexpr uint64_t kSize = 4 * layout::kMiB;

uint8_t patternByte(uint64_t offset) { return static_cast<uint8_t>((offset / kPage * 7 + offset % 251) | 1); }

class LazyFillTest : public ::testing::Test {
 protected:
  void SetUp() override {
    int probe = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC));
    if (probe < 0) GTEST_SKIP() << "no userfaultfd here: " << std::strerror(errno);
    ::close(probe);
    dir_ = std::filesystem::temp_directory_path() / fmt::format("lazy-fill-test-{}", ::getpid());
    std::filesystem::create_directories(dir_);
    imagePath_ = (dir_ / "memory").string();
    // Data in [64 KiB, 192 KiB) and [1 MiB + 8 KiB, 1 MiB + 12 KiB); the rest holes.
    extents_ = {{64 * 1024, 128 * 1024}, {layout::kMiB + 8192, 4096}};
    int fd = ::open(imagePath_.c_str(), O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::ftruncate(fd, kSize), 0);
    for (auto [offset, length] : extents_) {
      std::vector<uint8_t> bytes(length);
      for (uint64_t i = 0; i < length; ++i) bytes[i] = patternByte(offset + i);
      ASSERT_EQ(::pwrite(fd, bytes.data(), length, static_cast<off_t>(offset)), static_cast<ssize_t>(length));
    }
    ::close(fd);
    memory_ = std::make_unique<GuestMemory>(GuestMemory::create(kSize, "lazy-fill-test"));
  }
  void TearDown() override {
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  uint8_t expected(uint64_t offset) const {
    for (auto [start, length] : extents_) {
      if (offset >= start && offset < start + length) return patternByte(offset);
    }
    return 0;
  }
  uint8_t at(uint64_t offset) const {
    return static_cast<volatile uint8_t*>(memory_->mappingForRegistration().data())[offset];
  }
  // Pages of the memfd that exist (were filled): what the fork pays for.
  uint64_t residentPages() const {
    std::vector<unsigned char> vec(kSize / kPage);
    CLONE_SYSCALL(::mincore(memory_->mappingForRegistration().data(), kSize, vec.data()), "mincore");
    uint64_t n = 0;
    for (auto v : vec) n += v & 1;
    return n;
  }

  spdlog::logger log_{"lazy-fill-test"};
  std::filesystem::path dir_;
  std::string imagePath_;
  std::vector<std::pair<uint64_t, uint64_t>> extents_;
  std::unique_ptr<GuestMemory> memory_;
};

TEST_F(LazyFillTest, FaultsFillOnlyTheTouchedPageFromDataOrZero) {
  LazyMemoryFill fill(*memory_, imagePath_, extents_, log_);
  fill.start();
  // A data page, its neighbour across the extent's end, a hole page, the lone data page.
  std::vector<uint64_t> touched = {64 * 1024 + 5, 192 * 1024 - 1, 192 * 1024, 3 * layout::kMiB + 17,
                                   layout::kMiB + 8192 + 100};
  for (uint64_t offset : touched) EXPECT_EQ(at(offset), expected(offset)) << offset;
  // Every byte of the filled pages is right, not just the one read.
  for (uint64_t offset : touched) {
    uint64_t page = offset / kPage * kPage;
    for (uint64_t i = page; i < page + kPage; ++i) ASSERT_EQ(at(i), expected(i)) << i;
  }
  EXPECT_EQ(residentPages(), touched.size());
  // The fill thread counts a fault after the ioctl that woke the reader: let it finish.
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (fill.stats().faults < touched.size() && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  auto stats = fill.stats();
  EXPECT_EQ(stats.faults, touched.size());
  EXPECT_EQ(stats.copiedPages, 3u);
  EXPECT_EQ(stats.zeroedPages, 2u);
  EXPECT_EQ(stats.prefetchedPages, 0u);
  // Writes land in the fork's memory; the image is untouched.
  memory_->mappingForRegistration().data()[64 * 1024 + 5] = 0;
  EXPECT_EQ(at(64 * 1024 + 5), 0);
  int fd = ::open(imagePath_.c_str(), O_RDONLY | O_CLOEXEC);
  uint8_t byte = 0;
  ASSERT_EQ(::pread(fd, &byte, 1, 64 * 1024 + 5), 1);
  ::close(fd);
  EXPECT_EQ(byte, patternByte(64 * 1024 + 5));
}

TEST_F(LazyFillTest, PrefetchFillsRunsAcrossExtentsAndSkipsBadOffsets) {
  LazyMemoryFill fill(*memory_, imagePath_, extents_, log_);
  // A run from a hole into data and out again (56 KiB .. 200 KiB), a duplicate, unordered,
  // and offsets that are unaligned or out of range.
  std::vector<uint64_t> offsets;
  for (uint64_t o = 200 * 1024; o >= 56 * 1024; o -= kPage) offsets.push_back(o);
  offsets.push_back(100 * 1024);
  offsets.push_back(layout::kMiB + 8192);
  offsets.push_back(12345);
  offsets.push_back(kSize);
  offsets.push_back(kSize + kPage);
  fill.prefetch(offsets);
  uint64_t runPages = (200 - 56) / 4 + 1;
  auto stats = fill.stats();
  EXPECT_EQ(stats.prefetchedPages, runPages + 1);
  EXPECT_EQ(stats.copiedPages, 128 / 4 + 1u);
  EXPECT_EQ(stats.zeroedPages, runPages - 128 / 4);
  EXPECT_EQ(residentPages(), runPages + 1);
  fill.start();
  for (uint64_t o = 56 * 1024; o < 204 * 1024; ++o) ASSERT_EQ(at(o), expected(o)) << o;
  EXPECT_EQ(at(layout::kMiB + 8192 + 9), expected(layout::kMiB + 8192 + 9));
  EXPECT_EQ(fill.stats().faults, 0u) << "prefetched pages must not fault";
  EXPECT_EQ(at(2 * layout::kMiB), 0);
  EXPECT_EQ(fill.stats().faults, 1u);
}

TEST_F(LazyFillTest, RecordsThePagesFaultedUntilTheRecordEnds) {
  LazyMemoryFill fill(*memory_, imagePath_, extents_, log_);
  fill.start(/*recordFaults=*/true);
  (void)at(3 * layout::kMiB);
  (void)at(70 * 1024);
  (void)at(70 * 1024 + 1);  // the same page: recorded once
  auto recorded = fill.endRecording();
  EXPECT_EQ(recorded, (std::vector<uint64_t>{68 * 1024, 3 * layout::kMiB}));
  (void)at(2 * layout::kMiB);  // after the record ended: not recorded
  EXPECT_EQ(fill.stats().faults, 3u);
  EXPECT_EQ(fill.endRecording().size(), 2u);
}

TEST_F(LazyFillTest, RecordsNothingUnlessAsked) {
  LazyMemoryFill fill(*memory_, imagePath_, extents_, log_);
  fill.start();
  (void)at(3 * layout::kMiB);
  EXPECT_EQ(fill.stats().faults, 1u);
  EXPECT_TRUE(fill.endRecording().empty());
}

// A device process maps the same memfd without the core's userfaultfd (a fork's clone-block).
// What it reads there is what the template had, because every data page was filled first.
TEST_F(LazyFillTest, FillAllDataLeavesNoDataPageForADeviceMappingToMiss) {
  LazyMemoryFill fill(*memory_, imagePath_, extents_, log_);
  fill.prefetch({72 * 1024});  // one page filled already: skipped, not filled twice
  uint64_t dataPages = (128 * 1024 + 4096) / kPage;
  EXPECT_EQ(fill.fillAllData(), dataPages - 1);
  EXPECT_EQ(residentPages(), dataPages) << "holes are left unfilled";
  fill.start();
  void* device = ::mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_SHARED, memory_->fd(), 0);
  ASSERT_NE(device, MAP_FAILED);
  auto* bytes = static_cast<volatile uint8_t*>(device);
  for (auto [offset, length] : extents_) {
    for (uint64_t o = offset; o < offset + length; ++o) ASSERT_EQ(bytes[o], patternByte(o)) << o;
  }
  // The device touches a hole first: a zero page, as the template's; the core then reads
  // it without a fault (the page exists).
  EXPECT_EQ(bytes[3 * layout::kMiB + 5], 0);
  bytes[3 * layout::kMiB + 6] = 0x42;
  EXPECT_EQ(at(3 * layout::kMiB + 6), 0x42);
  EXPECT_EQ(at(3 * layout::kMiB + 5), 0);
  for (auto [offset, length] : extents_) EXPECT_EQ(at(offset + length - 1), expected(offset + length - 1));
  EXPECT_EQ(fill.stats().faults, 0u);
  ::munmap(device, kSize);
}

// A fork filled up front (a disk without postcopy): its holes fault in the kernel, as plain
// shmem, not through the fill thread.
TEST_F(LazyFillTest, HolesHandedToTheKernelFaultWithoutTheFill) {
  LazyMemoryFill fill(*memory_, imagePath_, extents_, log_);
  fill.start();
  EXPECT_THROW(fill.handHolesToTheKernel(), std::exception) << "data pages are unfilled";
  EXPECT_EQ(at(2 * layout::kMiB + 3), 0);  // one hole through the fill, before
  uint64_t dataPages = (128 * 1024 + 4096) / kPage;
  EXPECT_EQ(fill.fillAllData(), dataPages);
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(2);
  while (fill.stats().faults < 1 && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  fill.handHolesToTheKernel();
  std::vector<uint64_t> holes = {0, 200 * 1024, 3 * layout::kMiB + 17, kSize - 1};
  for (uint64_t offset : holes) EXPECT_EQ(at(offset), 0) << offset;
  memory_->mappingForRegistration().data()[3 * layout::kMiB + 18] = 0x42;
  EXPECT_EQ(at(3 * layout::kMiB + 18), 0x42);
  for (auto [offset, length] : extents_) {
    for (uint64_t o = offset; o < offset + length; ++o) ASSERT_EQ(at(o), patternByte(o)) << o;
  }
  EXPECT_EQ(residentPages(), dataPages + 1 + holes.size());
  auto stats = fill.stats();
  EXPECT_EQ(stats.faults, 1u) << "only the hole touched before the hand-over";
  EXPECT_EQ(stats.zeroedPages, 1u);
}

TEST_F(LazyFillTest, HolesStayWithTheFillWhileADeviceProcessFaults) {
  LazyMemoryFill fill(*memory_, imagePath_, extents_, log_);
  fill.fillAllData();
  int deviceFd = static_cast<int>(::syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK));
  ASSERT_GE(deviceFd, 0);
  fill.addDeviceFaults(UniqueFd(deviceFd), {}, "test-device");
  EXPECT_THROW(fill.handHolesToTheKernel(), std::exception);
}

// The fill runs inside clone-vmm's seccomp policy (kill mode): every ioctl it can issue must be
// allowed, the rare ones too. A page that exists before its fill (here written through the
// memfd, in a fork a racing fault) makes UFFDIO_COPY fail with EEXIST, and the fill then wakes
// the range with UFFDIO_WAKE; a policy without it killed forks at random (SIGSYS, no log line).
TEST_F(LazyFillTest, EveryFillPathRunsUnderTheCoresSeccompPolicy) {
  constexpr uint64_t kPresent = 80 * 1024;  // inside the first data extent
  pid_t child = ::fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    int code = 0;
    try {
      LazyMemoryFill fill(*memory_, imagePath_, extents_, log_);
      uint8_t mark = 0x5a;
      if (::pwrite(memory_->fd(), &mark, 1, kPresent) != 1) ::_exit(10);
      seccomp::install(seccomp::Kind::kVmm, seccomp::Mode::kKill);
      std::vector<uint64_t> run;
      for (uint64_t o = 64 * 1024; o < 96 * 1024; o += kPage) run.push_back(o);
      fill.prefetch(run);  // EEXIST at kPresent: page by page, then UFFDIO_WAKE
      fill.start();
      if (at(kPresent) != 0x5a) code = 11;                                 // kept, not overwritten
      if (at(72 * 1024 + 3) != patternByte(72 * 1024 + 3)) code = 12;      // prefetched data
      if (at(160 * 1024 + 1) != patternByte(160 * 1024 + 1)) code = 13;    // fault: UFFDIO_COPY
      if (at(2 * layout::kMiB + 9) != 0) code = 14;                        // fault: UFFDIO_ZEROPAGE
      fill.fillAllData();
      fill.handHolesToTheKernel();                                         // UFFDIO_UNREGISTER
      if (at(3 * layout::kMiB + 9) != 0) code = 16;                        // a plain shmem fault
    } catch (const std::exception&) {
      code = 15;
    }
    ::_exit(code);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(child, &status, 0), child);
  ASSERT_FALSE(WIFSIGNALED(status)) << "the fill was killed by signal " << WTERMSIG(status)
                                    << (WTERMSIG(status) == SIGSYS ? " (seccomp)" : "");
  EXPECT_EQ(WEXITSTATUS(status), 0) << "see the code's meaning in the test";
}

// vhost-user postcopy: a device process maps the same memfd and registers its mapping with
// a userfaultfd of its own (here: a second mapping and userfaultfd of this process, read
// from a thread as a back-end's worker would). Its faults are resolved by the fill.
TEST_F(LazyFillTest, DeviceFaultsAreFilledFromTheTemplateAndWoken) {
  LazyMemoryFill fill(*memory_, imagePath_, extents_, log_);
  fill.start();
  void* device = ::mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_SHARED, memory_->fd(), 0);
  ASSERT_NE(device, MAP_FAILED);
  UniqueFd deviceUffd = openUserfaultfd();
  uffdio_api api{};
  api.api = UFFD_API;
  ASSERT_EQ(::ioctl(deviceUffd.get(), UFFDIO_API, &api), 0);
  uffdio_register reg{};
  reg.range.start = reinterpret_cast<uint64_t>(device);
  reg.range.len = kSize;
  reg.mode = UFFDIO_REGISTER_MODE_MISSING;
  ASSERT_EQ(::ioctl(deviceUffd.get(), UFFDIO_REGISTER, &reg), 0);
  uint64_t base = reinterpret_cast<uint64_t>(device);
  fill.addDeviceFaults(std::move(deviceUffd), {{base, kSize, 0}}, "test device");
  auto* bytes = static_cast<volatile uint8_t*>(device);
  // Data, a hole, and a write to a page of data the guest never touched: the write lands
  // on the template's page, not on a zero page.
  EXPECT_EQ(bytes[100 * 1024 + 7], patternByte(100 * 1024 + 7));
  EXPECT_EQ(bytes[3 * layout::kMiB + 1], 0);
  bytes[layout::kMiB + 8192 + 5] = 0xee;
  EXPECT_EQ(bytes[layout::kMiB + 8192 + 6], patternByte(layout::kMiB + 8192 + 6));
  auto stats = fill.stats();
  EXPECT_EQ(stats.deviceFaults, 3u);
  // The core's mapping sees the same pages, without faulting.
  EXPECT_EQ(at(100 * 1024 + 7), patternByte(100 * 1024 + 7));
  EXPECT_EQ(at(layout::kMiB + 8192 + 5), 0xee);
  EXPECT_EQ(fill.stats().faults, stats.faults);
  // A page the core filled first: the device finds it without a fault.
  EXPECT_EQ(at(150 * 1024), patternByte(150 * 1024));
  EXPECT_EQ(bytes[150 * 1024], patternByte(150 * 1024));
  EXPECT_EQ(fill.stats().deviceFaults, 3u);
  ::munmap(device, kSize);
}

TEST_F(LazyFillTest, RejectsDeviceMappingsOutsideGuestMemory) {
  LazyMemoryFill fill(*memory_, imagePath_, extents_, log_);
  EXPECT_THROW(fill.addDeviceFaults(openUserfaultfd(), {{0x10000, kSize, kPage}}, "d"), Error);
  EXPECT_THROW(fill.addDeviceFaults(openUserfaultfd(), {{0x10001, kPage, 0}}, "d"), Error);
}

// A fault on a page the fill had filled (a second thread's, queued before the fill) is
// answered by filling it again: EEXIST, and the page is woken. Were the page gone (here:
// punched out of the memfd behind the fill's back), that refill brings the template's bytes
// back instead of leaving the thread to fault on it forever.
TEST_F(LazyFillTest, AFaultOnAFilledPageFillsItAgainInsteadOfOnlyWaking) {
  LazyMemoryFill fill(*memory_, imagePath_, extents_, log_);
  fill.start();
  constexpr uint64_t kData = 100 * 1024;
  EXPECT_EQ(at(kData + 3), patternByte(kData + 3));
  ASSERT_EQ(::fallocate(memory_->fd(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                        static_cast<off_t>(kData), static_cast<off_t>(kPage)),
            0);
  EXPECT_EQ(at(kData + 3), patternByte(kData + 3));
  auto stats = fill.stats();
  EXPECT_EQ(stats.faults, 2u);
  EXPECT_EQ(stats.refaults, 1u);
  EXPECT_EQ(stats.copiedPages, 1u) << "a refill is not counted as a new page";
}

TEST_F(LazyFillTest, RejectsExtentsOutsideTheImageOrUnaligned) {
  EXPECT_THROW(LazyMemoryFill(*memory_, imagePath_, {{100, 4096}}, log_), Error);
  EXPECT_THROW(LazyMemoryFill(*memory_, imagePath_, {{kSize - kPage, 2 * kPage}}, log_), Error);
}

}  // namespace
}  // namespace clonevm::vmm
